//! Who is asking: the one place a request's caller is decided.
//!
//! For now a caller is the user name the request claims. The security issue replaces this
//! with the CURVE public key that ZAP authenticated for the connection, so every handler
//! asks here and nowhere else.

use agora_common::proto::UserName;

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's user name.
    pub user: UserName,
}

/// The caller of a request that claims to come from `claimed`.
pub fn caller(claimed: &UserName) -> Caller {
    Caller {
        user: claimed.clone(),
    }
}
