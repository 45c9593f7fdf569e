//! `list`: every live group.

use agora_proto::time::Timestamp;
use agora_proto::wire::ListReply;

use crate::directory::Directory;

/// Live groups, sorted by name.
pub fn apply(dir: &Directory, now: Timestamp) -> ListReply {
    ListReply {
        groups: dir.list(now),
    }
}
