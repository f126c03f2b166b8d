//! What `sluice demo` prints: ready-to-paste commands against the running demo.

use std::net::SocketAddr;

/// The demo's instructions for a gateway at `api` (admin at `admin`) over a mock agent at `mock`.
pub fn instructions(api: SocketAddr, admin: SocketAddr, mock: SocketAddr) -> String {
    let base = format!("http://{api}");
    format!(
        r#"
Sluice demo: gateway {base}, admin http://{admin}, mock agent http://{mock}
Authentication is disabled in the demo; every request acts as organisation "org_dev".

1. Stream a run (AI SDK v5 UI-message stream over SSE):

  curl -N {base}/api/invokeAgent -H 'content-type: application/json' \
    -d '{{"agentId":1,"message":{{"id":"u1","role":"user","parts":[{{"type":"text","text":"Hello there"}}]}}}}'

2. Start a run without holding a stream (202 Accepted), then poll its snapshot:

  curl -si {base}/api/invokeAgent -H 'x-stream-response: false' -H 'content-type: application/json' \
    -d '{{"agentId":1,"message":{{"role":"user","parts":[{{"type":"text","text":"scenario:slow tokens=40"}}]}}}}'
  curl -s '{base}/api/getConversation?threadId=THREAD_ID'      # THREAD_ID from X-Thread-ID

3. Reconnect: start a slow stream, cut it with Ctrl-C, then resume after the last id you saw
   (or leave out Last-Event-ID to replay the run from its start):

  curl -Ni {base}/api/invokeAgent -H 'content-type: application/json' \
    -d '{{"agentId":1,"message":{{"role":"user","parts":[{{"type":"text","text":"scenario:slow tokens=60"}}]}}}}'
  curl -N {base}/api/threads/THREAD_ID/stream -H 'Last-Event-ID: 5'

Other scenarios (put them in the message text): scenario:reasoning, scenario:tools,
scenario:error, scenario:drop, scenario:malformed, scenario:hang, scenario:long events=5000.
Metrics: curl -s http://{admin}/metrics | grep ^sluice_
"#
    )
}
