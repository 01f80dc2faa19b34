//! Connecting to a node that never answers gives up after `CONNECT_TIMEOUT` with a `TimedOut`
//! error, instead of holding the caller (router start-up, health checks, a prefill node's KV ship)
//! for the kernel's SYN retries.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::Duration;

use exo_protocol::{CONNECT_TIMEOUT, connect};

#[tokio::test]
async fn connect_gives_up_on_a_host_that_never_answers() -> std::io::Result<()> {
    // A listener that never accepts, with a backlog of 0: once its queue holds one connection the
    // kernel drops further SYNs, exactly what a host that drops packets looks like to a client.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?)?;
    let listener = socket.listen(0)?;
    let addr = listener.local_addr()?;
    let mut queued = Vec::new();
    while let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        queued.push(s);
        assert!(queued.len() < 64, "the listener's queue never filled");
    }

    // The outer timeout only keeps a regression from hanging the test run.
    let attempt = tokio::time::timeout(
        CONNECT_TIMEOUT * 10,
        connect(&addr.to_string(), &exo_protocol::LinkSecurity::Plain),
    )
    .await;
    let Ok(result) = attempt else {
        panic!("connect did not give up on its own");
    };
    match result {
        Ok(_) => panic!("connected to a listener whose queue is full"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            assert!(e.to_string().contains(&addr.to_string()), "{e}");
        }
    }
    drop(listener);
    Ok(())
}
