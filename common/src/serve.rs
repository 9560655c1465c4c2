//! Serving a router over HTTP/1.1 with the limits `axum::serve` leaves out:
//! a connection must send its request line and headers within the header timeout
//! (a client that opens a connection and sends nothing, or trickles its headers, is
//! cut off instead of holding its connection, task and memory), and each request is
//! told which address it came from ([`ConnectInfo`]).
//!
//! Shutdown is graceful: once `shutdown` completes no connection is accepted, and
//! the requests in progress are finished.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Notify};
use tower::ServiceExt as _;

/// Serves `router` on `listener` until `shutdown` completes, then waits for the
/// requests in progress. A connection that has not sent its first whole request head
/// within `header_timeout` of opening is closed; on a kept-alive connection, hyper
/// times each later head the same way once it has begun to come.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // HTTP/1 only: telling HTTP/2 apart would read the connection's first bytes with no
    // timer, and an HTTP/2 connection has no header timeout at all.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Told when the connection's first request head has come in whole.
        let first_head = Arc::new(Notify::new());
        let heard = Arc::clone(&first_head);
        let service = router
            .clone()
            .map_request(move |mut request: axum::http::Request<_>| {
                heard.notify_one();
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let connection = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(stream),
                    TowerToHyperService::new(service),
                )
                .into_owned();
            let connection = watcher.watch(connection);
            tokio::pin!(connection);
            // hyper times a head only once it has started to parse one, which a client
            // sending nothing, or a byte, never lets it: the first head is timed here.
            tokio::select! {
                ended = &mut connection => return log_end(peer, ended),
                () = first_head.notified() => {}
                () = tokio::time::sleep(header_timeout) => {
                    tracing::debug!(%peer, "closed a connection that sent no request head in time");
                    return;
                }
            }
            log_end(peer, connection.await);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn log_end<E: std::fmt::Display>(peer: SocketAddr, ended: Result<(), E>) {
    if let Err(error) = ended {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// The address a request came from, as [`serve`] records it.
pub fn peer(request: &axum::http::request::Parts) -> Option<SocketAddr> {
    request
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer)
}
