//! The one background-thread primitive: an actor, as the zguide (chapter 4) and CZMQ's
//! `zactor` describe it. A thread owns its sockets; its owner talks to it over an inproc
//! `PAIR` pipe. The thread polls the pipe beside its own sockets, so a stop wakes it at once:
//! no flag checked every 100 ms.
//!
//! # Pipe messages
//! Owner → actor: a command, any frames the actor defines, or the one frame `$TERM`, which
//! ends the actor (as in CZMQ). Actor → owner: whatever events the actor defines. Dropping the
//! [`Actor`] sends `$TERM` and joins the thread.
//!
//! # Use
//! ```no_run
//! # use agora_common::actor::{Actor, Wake};
//! let ctx = zmq::Context::new();
//! let actor = Actor::start(&ctx, "ticker", |pipe| loop {
//!     match pipe.wait(Some(std::time::Duration::from_secs(1))) {
//!         Wake::Term => return,
//!         Wake::Command(frames) => { /* act on a command */ }
//!         Wake::Timeout => { /* the periodic work */ }
//!     }
//! })?;
//! drop(actor); // wakes the thread at once, and joins it
//! # Ok::<(), std::io::Error>(())
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The frame that ends an actor.
pub const TERM: &[u8] = b"$TERM";

static PIPE_ID: AtomicU64 = AtomicU64::new(0);

/// The owner's handle on an actor thread. Dropping it stops the actor and waits for it.
pub struct Actor {
    pipe: zmq::Socket,
    name: String,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor").field("name", &self.name).finish()
    }
}

/// The actor's end of the pipe, handed to its body.
pub struct Pipe {
    socket: zmq::Socket,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe").finish_non_exhaustive()
    }
}

/// What woke an actor waiting on its pipe.
#[derive(Debug)]
pub enum Wake {
    /// The owner said `$TERM`, or is gone: return.
    Term,
    /// A command from the owner.
    Command(Vec<Vec<u8>>),
    /// The wait's timeout passed.
    Timeout,
}

impl Actor {
    /// Starts `body` on a thread named `name`, handing it its end of a new pipe.
    ///
    /// # Errors
    /// libzmq's (as `io::Error`) or the thread spawn's.
    pub fn start<F>(ctx: &zmq::Context, name: &str, body: F) -> std::io::Result<Actor>
    where
        F: FnOnce(Pipe) + Send + 'static,
    {
        let zmq_io = |e: zmq::Error| std::io::Error::other(e.to_string());
        let endpoint = format!(
            "inproc://agora-actor-{name}-{}",
            PIPE_ID.fetch_add(1, Ordering::Relaxed)
        );
        let pipe = ctx.socket(zmq::PAIR).map_err(zmq_io)?;
        pipe.set_linger(0).map_err(zmq_io)?;
        pipe.bind(&endpoint).map_err(zmq_io)?;
        let child = ctx.socket(zmq::PAIR).map_err(zmq_io)?;
        child.set_linger(0).map_err(zmq_io)?;
        child.connect(&endpoint).map_err(zmq_io)?;
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(Pipe { socket: child }))?;
        Ok(Actor {
            pipe,
            name: name.to_owned(),
            thread: Some(thread),
        })
    }

    /// Sends a command to the actor, without waiting (the pipe queues up to libzmq's HWM).
    ///
    /// # Errors
    /// libzmq's: `EAGAIN` when the actor has not read 1000 commands.
    pub fn send(&self, frames: &[&[u8]]) -> Result<(), zmq::Error> {
        self.pipe.send_multipart(frames, zmq::DONTWAIT)
    }

    /// The next event the actor sent, waiting up to `timeout` (`None`: not at all).
    ///
    /// # Errors
    /// libzmq's (context terminated).
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Option<Vec<Vec<u8>>>, zmq::Error> {
        let ms = timeout.map_or(0, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
        if self.pipe.poll(zmq::POLLIN, ms)? == 0 {
            return Ok(None);
        }
        self.pipe.recv_multipart(zmq::DONTWAIT).map(Some)
    }

    /// The pipe, to poll for the actor's events beside other sockets.
    pub fn as_poll_item(&self) -> zmq::PollItem<'_> {
        self.pipe.as_poll_item(zmq::POLLIN)
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        // A send to a PAIR whose peer is gone can fail; the thread has returned then.
        let _ = self.pipe.send(TERM, zmq::DONTWAIT);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(actor = %self.name, "actor thread panicked");
            }
        }
    }
}

impl Pipe {
    /// The pipe as a poll item, to poll it beside the actor's own sockets (put it first).
    pub fn as_poll_item(&self) -> zmq::PollItem<'_> {
        self.socket.as_poll_item(zmq::POLLIN)
    }

    /// Takes what the owner sent, without waiting: a command, `Wake::Term`, or
    /// `Wake::Timeout` when nothing is waiting.
    pub fn take(&self) -> Wake {
        match self.socket.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) if frames.len() == 1 && frames[0] == TERM => Wake::Term,
            Ok(frames) => Wake::Command(frames),
            Err(zmq::Error::EAGAIN) => Wake::Timeout,
            Err(_) => Wake::Term,
        }
    }

    /// Waits up to `timeout` (`None`: forever) for the owner.
    pub fn wait(&self, timeout: Option<Duration>) -> Wake {
        let ms = timeout.map_or(-1, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
        match self.socket.poll(zmq::POLLIN, ms) {
            Ok(0) => Wake::Timeout,
            Ok(_) => self.take(),
            Err(zmq::Error::EINTR) => Wake::Timeout,
            Err(_) => Wake::Term,
        }
    }

    /// Waits until `deadline` for the owner; `Wake::Timeout` once it passes.
    pub fn wait_until(&self, deadline: Instant) -> Wake {
        self.wait(Some(deadline.saturating_duration_since(Instant::now())))
    }

    /// Sends an event to the owner, without waiting.
    ///
    /// # Errors
    /// libzmq's: `EAGAIN` when the owner has not read 1000 events.
    pub fn send(&self, frames: &[&[u8]]) -> Result<(), zmq::Error> {
        self.socket.send_multipart(frames, zmq::DONTWAIT)
    }
}

/// Milliseconds until `deadline` as `zmq::poll` takes them (0 once it has passed).
pub fn poll_ms_until(deadline: Instant) -> i64 {
    i64::try_from(
        deadline
            .saturating_duration_since(Instant::now())
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_arrive_in_order_and_a_stop_wakes_a_thread_waiting_forever() {
        let ctx = zmq::Context::new();
        let actor = Actor::start(&ctx, "echo", |pipe| loop {
            match pipe.wait(None) {
                Wake::Term => return,
                Wake::Command(frames) => {
                    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                    let _ = pipe.send(&refs);
                }
                Wake::Timeout => {}
            }
        })
        .expect("start");
        for n in 0u8..5 {
            actor.send(&[b"n", &[n]]).expect("send");
        }
        for n in 0u8..5 {
            let got = actor
                .recv(Some(Duration::from_secs(5)))
                .expect("recv")
                .expect("an echo within 5 s");
            assert_eq!(got, vec![b"n".to_vec(), vec![n]]);
        }
        // The thread waits with no timeout: only the $TERM of drop can end it, and the join
        // in drop returns (the test would hang otherwise).
        drop(actor);
    }
}
