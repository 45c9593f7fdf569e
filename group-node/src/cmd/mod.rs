//! One handler per group-node action. Each takes the decoded request and a [`Ctx`], and
//! returns the reply body or a [`WireError`]; none touches the socket. Writes go into the
//! store's open batch and are acked by the caller after the batch commits.

use agora_common::proto::{ErrorCode, GroupName, WireError};
use agora_common::store::{GroupStore, StoreError};
use agora_common::time::Timestamp;

use crate::identity::Caller;
use crate::Config;

pub mod get_messages;
pub mod info;
pub mod join;
pub mod leave;
pub mod members;
pub mod send;

/// What a handler may use.
pub struct Ctx<'a, S: GroupStore> {
    /// The group's store, inside an open batch.
    pub store: &'a mut S,
    /// The node's settings.
    pub config: &'a Config,
    /// The wall-clock time of this batch.
    pub now: Timestamp,
}

impl<S: GroupStore> Ctx<'_, S> {
    /// Checks a request's optional `group` against this node's.
    ///
    /// # Errors
    /// `unknown_group` when it names another group.
    pub fn check_group(&self, group: Option<&GroupName>) -> Result<(), WireError> {
        match group {
            Some(g) if *g != self.config.name => Err(WireError::new(
                ErrorCode::UnknownGroup,
                format!("this node serves \"{}\", not \"{g}\"", self.config.name),
            )),
            _ => Ok(()),
        }
    }

    /// Checks that `caller` is a member.
    ///
    /// # Errors
    /// `not_member`; `internal` if the store fails.
    pub fn require_member(&self, caller: &Caller) -> Result<(), WireError> {
        if self.store.is_member(&caller.user).map_err(store_error)? {
            Ok(())
        } else {
            Err(WireError::new(
                ErrorCode::NotMember,
                format!(
                    "{} is not a member of \"{}\"",
                    caller.user, self.config.name
                ),
            ))
        }
    }
}

/// Maps a storage failure to its wire error: `id_conflict` for a reused id, `internal`
/// (logged) for the rest.
pub fn store_error(e: StoreError) -> WireError {
    match e {
        StoreError::IdConflict(id) => WireError::new(
            ErrorCode::IdConflict,
            format!("message id {id} is already used by a different message"),
        ),
        other => {
            tracing::error!(error = %other, "store failed");
            WireError::new(ErrorCode::Internal, "storage failure; retry later")
        }
    }
}
