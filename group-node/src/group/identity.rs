//! Who is asking: the one place a request's caller is decided.
//!
//! With CURVE, the caller is the public key that the ZAP handler authenticated for the
//! connection (the `User-Id` of the request's frames); the `user` field of a request is only
//! the name the caller asks to be shown as, bound to the key when it joins. A forged `user`
//! field therefore changes nothing: the member is found by key. On an `--insecure` node there
//! is no key, and the claimed name is all there is.

use crate::store::Principal;
use agora_common::keys::PublicKey;
use agora_proto::wire::UserName;

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who the caller is, for membership.
    pub principal: Principal,
    /// The authenticated key (`None` on an `--insecure` node).
    pub key: Option<PublicKey>,
    /// The name the request claims; used only to name a new member.
    pub claimed: UserName,
}

/// The caller of a request that came from `peer` (the authenticated key, if any) and claims
/// to be `claimed`.
pub fn caller(claimed: &UserName, peer: Option<PublicKey>) -> Caller {
    let principal = match &peer {
        Some(key) => Principal::key(key),
        None => Principal::name(claimed),
    };
    Caller {
        principal,
        key: peer,
        claimed: claimed.clone(),
    }
}
