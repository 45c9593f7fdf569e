//! `list`: every live group.

use agora_common::proto::ListReply;
use agora_common::time::Timestamp;

use crate::directory::Directory;

/// Live groups, sorted by name.
pub fn apply(dir: &Directory, now: Timestamp) -> ListReply {
    ListReply {
        groups: dir.list(now),
    }
}
