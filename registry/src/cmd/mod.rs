//! One handler per registry action. Each takes the decoded request and returns the reply
//! body or a [`WireError`](agora_proto::wire::WireError); none touches the socket.

pub mod dm;
pub mod list;
pub mod lookup;
pub mod register;
pub mod unregister;
pub mod users;
