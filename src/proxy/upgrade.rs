//! The tunnel after `101 Switching Protocols` (WebSocket): bytes relayed both ways.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use crate::control::Arm;
use crate::metrics::InFlight;
use crate::upstream::h1::Upgraded;

/// Relays bytes both ways between the upgraded client and upstream connections until either
/// side closes. The request stays in flight for as long as the tunnel is open.
pub(super) fn relay_upgrade(client: OnUpgrade, upstream: Upgraded, in_flight: InFlight, arm: &Arm) {
    let name = arm.name.clone();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let Upgraded { io: mut u, read } = upstream;
        let relayed = async {
            let mut c = TokioIo::new(client.await.map_err(std::io::Error::other)?);
            // What the upstream sent right behind its 101 head goes first.
            c.write_all(&read).await?;
            tokio::io::copy_bidirectional(&mut c, &mut u).await
        };
        if let Err(e) = relayed.await {
            tracing::debug!(upstream = %name, error = %e, "upgraded connection ended");
        }
    });
}
