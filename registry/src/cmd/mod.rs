//! One handler per registry action. Each takes the store and the decoded request and
//! returns the reply body or a [`WireError`]; none touches the socket.

use agora_proto::wire::{ErrorCode, WireError};

use crate::store::StoreError;

pub mod block;
pub mod dm;
pub mod heartbeat_host;
pub mod list;
pub mod lookup;
pub mod owner;
pub mod register;
pub mod register_groups;
pub mod release;
pub mod unregister;
pub mod users;

/// The `internal` reply for a storage failure, which is logged here unless the store logged
/// its cause already ([`StoreError::is_logged`]); the peer learns only that it may retry.
fn internal(e: StoreError) -> WireError {
    if e.is_logged() {
        tracing::debug!(error = %e, "registry store failed");
    } else {
        tracing::error!(error = %e, "registry store failed");
    }
    WireError::new(ErrorCode::Internal, "registry storage failure; retry later")
}
