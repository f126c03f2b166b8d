// Mints Clerk-shaped session tokens with `jose` (a JWT library Sluice did not write), for the
// gateway's authentication tests. Prints one JSON object: {jwks, tokens: {name: jwt}}.
//
// usage: node mint_tokens.mjs ISSUER

import { generateKeyPair, exportJWK, SignJWT } from 'jose';

const issuer = process.argv[2];
const now = Math.floor(Date.now() / 1000);
const keys = [];
const tokens = {};

for (const [alg, kid] of [['RS256', 'jose-rsa'], ['ES256', 'jose-ec'], ['EdDSA', 'jose-ed']]) {
  const { publicKey, privateKey } = await generateKeyPair(alg, alg === 'EdDSA' ? { crv: 'Ed25519' } : {});
  const jwk = await exportJWK(publicKey);
  keys.push({ ...jwk, kid, alg, use: 'sig' });
  const sign = (claims) => new SignJWT(claims)
    .setProtectedHeader({ alg, kid, typ: 'JWT' })
    .setIssuer(issuer).setSubject('user_jose').setIssuedAt(now).setNotBefore(now - 5).setExpirationTime(now + 120)
    .sign(privateKey);
  tokens[`${alg}_v2_admin`] = await sign({ v: 2, sts: 'active', azp: 'http://localhost:3000', o: { id: 'org_jose', rol: 'admin', slg: 'jose' } });
  tokens[`${alg}_v1_admin`] = await sign({ org_id: 'org_jose', org_role: 'org:admin', org_slug: 'jose' });
  tokens[`${alg}_v2_member`] = await sign({ v: 2, sts: 'active', o: { id: 'org_jose', rol: 'member' } });
}

console.log(JSON.stringify({ jwks: { keys }, tokens }));
