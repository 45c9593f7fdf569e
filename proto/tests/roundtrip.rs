//! Property: for every request and reply type, encoding then decoding gives back the value
//! (and encoding it again gives the same bytes).

use agora_proto::action::{KeyRequest, NodeRequest, RegistryRequest, ServerRequest};
use agora_proto::codec::{
    decode_reply, decode_request, encode_error, encode_ok, encode_request, Frames,
};
use agora_proto::id::MessageId;
use agora_proto::time::Timestamp;
use agora_proto::wire::*;
use proptest::prelude::*;
use serde_json::value::RawValue;

/// A request of any role, as the strategy makes them.
#[derive(Debug, Clone)]
enum AnyRequest {
    Registry(RegistryRequest),
    Node(NodeRequest),
    Key(KeyRequest),
}

impl From<RegistryRequest> for AnyRequest {
    fn from(r: RegistryRequest) -> Self {
        AnyRequest::Registry(r)
    }
}

impl From<NodeRequest> for AnyRequest {
    fn from(r: NodeRequest) -> Self {
        AnyRequest::Node(r)
    }
}

impl From<KeyRequest> for AnyRequest {
    fn from(r: KeyRequest) -> Self {
        AnyRequest::Key(r)
    }
}

/// Encodes `req`, decodes it with its role's enum, and returns both encodings.
fn encode_twice(req: &AnyRequest) -> (Frames, Frames) {
    fn via<R: ServerRequest>(r: &R) -> (Frames, Frames) {
        let wire = encode_request(r);
        let back: R = decode_request(&wire).expect("decodes");
        assert_eq!(back.action(), r.action());
        (wire, encode_request(&back))
    }
    match req {
        AnyRequest::Registry(r) => via(r),
        AnyRequest::Node(r) => via(r),
        AnyRequest::Key(r) => via(r),
    }
}

fn group() -> impl Strategy<Value = GroupName> {
    prop_oneof![
        "[A-Za-z0-9][A-Za-z0-9 _.-]{0,30}[A-Za-z0-9]",
        "[A-Za-z]",
        "\\PC{1,20}",
    ]
    .prop_filter_map("valid group name", |s| GroupName::new(s).ok())
}

fn user() -> impl Strategy<Value = UserName> {
    "[A-Za-z0-9_.-]{1,32}".prop_map(|s| UserName::new(s).expect("valid by construction"))
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (
        prop_oneof![
            "[a-z][a-z0-9-]{0,20}".boxed(),
            (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
                .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}"))
                .boxed(),
            Just("[::1]".to_owned()).boxed(),
        ],
        1u16..,
    )
        .prop_map(|(host, port)| Endpoint::new(format!("tcp://{host}:{port}")).expect("valid"))
}

fn key() -> impl Strategy<Value = Option<agora_proto::key::PublicKey>> {
    prop::option::of(any::<[u8; 32]>().prop_map(agora_proto::key::PublicKey::from_bytes))
}

fn time() -> impl Strategy<Value = Timestamp> {
    // Year 1 to 9999, what RFC 3339 can write.
    (-62_135_596_800_000_000i64..=253_402_300_799_999_999).prop_map(Timestamp::from_micros)
}

fn id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId::from_bytes)
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "\\PC{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Box<RawValue>> {
    json().prop_map(|v| RawValue::from_string(v.to_string()).expect("serde_json writes JSON"))
}

fn kind() -> impl Strategy<Value = EntryKind> {
    prop_oneof![
        Just(EntryKind::Message),
        Just(EntryKind::Join),
        Just(EntryKind::Leave),
        Just(EntryKind::Policy)
    ]
}

fn membership() -> impl Strategy<Value = MembershipRequest> {
    (prop::option::of(group()), user()).prop_map(|(group, user)| MembershipRequest { group, user })
}

fn key_target() -> impl Strategy<Value = KeyTargetRequest> {
    (prop::option::of(group()), user(), any::<[u8; 32]>()).prop_map(|(group, user, key)| {
        KeyTargetRequest {
            group,
            user,
            key: agora_proto::key::PublicKey::from_bytes(key),
        }
    })
}

fn member_target() -> impl Strategy<Value = MemberTargetRequest> {
    (prop::option::of(group()), user(), user()).prop_map(|(group, user, member)| {
        MemberTargetRequest {
            group,
            user,
            member,
        }
    })
}

fn request() -> impl Strategy<Value = AnyRequest> {
    prop_oneof![
        (group(), endpoint(), any::<u64>(), key()).prop_map(
            |(name, endpoint, members, public_key)| {
                AnyRequest::from(RegistryRequest::Register(RegisterRequest {
                    name,
                    endpoint,
                    members,
                    public_key,
                }))
            }
        ),
        (group(), endpoint()).prop_map(|(name, endpoint)| AnyRequest::from(
            RegistryRequest::Unregister(UnregisterRequest { name, endpoint })
        )),
        Just(AnyRequest::from(RegistryRequest::List(ListRequest {}))),
        group().prop_map(|name| AnyRequest::from(RegistryRequest::Lookup(LookupRequest { name }))),
        prop::option::of(group())
            .prop_map(|group| AnyRequest::from(NodeRequest::Info(InfoRequest { group }))),
        membership().prop_map(|r| AnyRequest::from(NodeRequest::Join(r))),
        membership().prop_map(|r| AnyRequest::from(NodeRequest::Leave(r))),
        (
            prop::option::of(group()),
            user(),
            any::<bool>(),
            prop::option::of(any::<u64>())
        )
            .prop_map(|(group, user, batch, acked_seq)| {
                AnyRequest::from(NodeRequest::Subscribe(SubscribeRequest {
                    group,
                    user,
                    batch,
                    acked_seq,
                }))
            }),
        membership().prop_map(|r| AnyRequest::from(NodeRequest::Unsubscribe(r))),
        user().prop_map(
            |name| AnyRequest::from(RegistryRequest::UserRegister(UserNameRequest { name }))
        ),
        user().prop_map(|name| AnyRequest::from(RegistryRequest::Whois(UserNameRequest { name }))),
        (user(), any::<bool>()).prop_map(|(name, confirm)| {
            AnyRequest::from(RegistryRequest::UserUnregister(UserUnregisterRequest {
                name,
                confirm,
            }))
        }),
        Just(AnyRequest::from(RegistryRequest::Users(ListRequest {}))),
        Just(AnyRequest::from(KeyRequest::ServerKey(ServerKeyRequest {}))),
        key_target().prop_map(|r| AnyRequest::from(NodeRequest::Invite(r))),
        key_target().prop_map(|r| AnyRequest::from(NodeRequest::Ban(r))),
        key_target().prop_map(|r| AnyRequest::from(NodeRequest::Unban(r))),
        member_target().prop_map(|r| AnyRequest::from(NodeRequest::Kick(r))),
        member_target().prop_map(|r| AnyRequest::from(NodeRequest::Promote(r))),
        (prop::option::of(group()), user(), any::<bool>()).prop_map(|(group, user, private)| {
            AnyRequest::from(NodeRequest::SetMode(SetModeRequest {
                group,
                user,
                mode: if private {
                    GroupMode::Private
                } else {
                    GroupMode::Open
                },
            }))
        }),
        prop::option::of(group())
            .prop_map(|group| AnyRequest::from(NodeRequest::Members(MembersRequest { group }))),
        (
            prop::option::of(group()),
            user(),
            body(),
            prop::option::of(id())
        )
            .prop_map(
                |(group, user, body, id)| AnyRequest::from(NodeRequest::Send(SendRequest {
                    group,
                    user,
                    body,
                    id,
                    attachment: None,
                }))
            ),
        (
            prop::option::of(group()),
            user(),
            prop::option::of(any::<u64>()),
            prop::option::of(time()),
            prop::option::of(id()),
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
        )
            .prop_map(|(group, user, after_seq, since, id, latest, limit)| {
                AnyRequest::from(NodeRequest::GetMessages(GetMessagesRequest {
                    group,
                    user,
                    after_seq,
                    since,
                    id,
                    latest,
                    limit,
                }))
            }),
    ]
}

fn attachment() -> impl Strategy<Value = Option<Attachment>> {
    prop::option::of(
        (any::<[u8; 32]>(), any::<u64>(), "[a-z0-9 ._-]{1,40}").prop_map(|(d, size, name)| {
            Attachment {
                sha256: Sha256Digest::from_bytes(d),
                size,
                name,
                media_type: "application/octet-stream".into(),
            }
        }),
    )
}

fn entry() -> impl Strategy<Value = Message> {
    (
        (any::<u64>(), id(), time(), user(), kind()),
        (body(), key(), attachment()),
    )
        .prop_map(
            |((seq, id, time, sender, kind), (body, sender_key, attachment))| Message {
                seq,
                id,
                time,
                sender,
                kind,
                body,
                sender_key,
                attachment,
            },
        )
}

fn group_entry() -> impl Strategy<Value = GroupEntry> {
    (group(), endpoint(), any::<u64>(), time(), time(), key()).prop_map(
        |(name, endpoint, members, registered_at, last_heartbeat, public_key)| GroupEntry {
            name,
            endpoint,
            members,
            registered_at,
            last_heartbeat,
            public_key,
        },
    )
}

fn round_trip<T>(value: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    decode_reply::<T>(&encode_ok(value))
        .expect("well-formed frames")
        .expect("an ok reply")
}

proptest! {
    #[test]
    fn every_request_round_trips(req in request()) {
        let (wire, again) = encode_twice(&req);
        prop_assert_eq!(again, wire);
    }

    #[test]
    fn entry_replies_round_trip(
        g in group(),
        entries in prop::collection::vec(entry(), 0..5),
        more in any::<bool>(),
    ) {
        let page = MessagesPage { group: g.clone(), messages: entries.clone(), more };
        prop_assert_eq!(round_trip(&page), page);
        let batch = PushBatch { event: "entries".into(), group: g.clone(), entries: entries.clone() };
        prop_assert_eq!(round_trip(&batch), batch);
        for e in entries {
            let event = PushEvent { event: "entry".into(), group: g.clone(), entry: e };
            prop_assert_eq!(round_trip(&event), event);
        }
    }

    #[test]
    fn registry_replies_round_trip(
        entries in prop::collection::vec(group_entry(), 0..5),
        heartbeat_ms in any::<u64>(),
        ttl_ms in any::<u64>(),
    ) {
        let list = ListReply { groups: entries.clone() };
        prop_assert_eq!(round_trip(&list), list);
        for group in entries {
            let lookup = LookupReply { group: group.clone() };
            prop_assert_eq!(round_trip(&lookup), lookup);
            let reg = RegisterReply { group, heartbeat_ms, ttl_ms };
            prop_assert_eq!(round_trip(&reg), reg);
        }
    }

    #[test]
    fn node_replies_round_trip(
        g in group(),
        u in user(),
        n in any::<u64>(),
        changed in any::<bool>(),
        t in time(),
        i in id(),
        members in prop::collection::vec((user(), time(), key()), 0..5),
    ) {
        let mode = if changed { GroupMode::Private } else { GroupMode::Open };
        let info = InfoReply {
            group: g.clone(),
            last_seq: n,
            members: n / 2,
            max_message_bytes: n,
            mode,
        };
        let policy = PolicyReply { group: g.clone(), changed, last_seq: n };
        prop_assert_eq!(round_trip(&policy), policy);
        prop_assert_eq!(round_trip(&info), info);
        let m = MembershipReply { group: g.clone(), user: u, changed, last_seq: n };
        prop_assert_eq!(round_trip(&m), m);
        let list = MembersReply {
            group: g.clone(),
            members: members
                .into_iter()
                .map(|(user, joined_at, key)| Member { user, joined_at, key })
                .collect(),
        };
        prop_assert_eq!(round_trip(&list), list);
        let ack = SendAck { seq: n, id: i, time: t, duplicate: changed };
        prop_assert_eq!(round_trip(&ack), ack);
        let sub = SubscribeReply { group: g.clone(), last_seq: n, lease_ms: n, budget_bytes: n };
        prop_assert_eq!(round_trip(&sub), sub);
        let unsub = UnsubscribeReply { group: g, changed };
        prop_assert_eq!(round_trip(&unsub), unsub);
    }

    #[test]
    fn account_replies_round_trip(
        users in prop::collection::vec((user(), any::<[u8; 32]>(), time()), 0..5),
        changed in any::<bool>(),
    ) {
        let entries: Vec<UserEntry> = users
            .into_iter()
            .map(|(name, key, registered_at)| UserEntry {
                name,
                key: agora_proto::key::PublicKey::from_bytes(key),
                registered_at,
                presence: if changed { Presence::Away } else { Presence::Offline },
                last_seen: changed.then_some(registered_at),
            })
            .collect();
        let list = UsersReply { users: entries.clone() };
        prop_assert_eq!(round_trip(&list), list);
        for user in entries {
            let key = ServerKeyReply { public_key: user.key };
            prop_assert_eq!(round_trip(&key), key);
            let one = UserReply { user, changed };
            prop_assert_eq!(round_trip(&one), one);
        }
    }

    #[test]
    fn error_replies_round_trip(code in prop::sample::select(vec![
        ErrorCode::BadFrames, ErrorCode::UnsupportedVersion, ErrorCode::InvalidJson,
        ErrorCode::InvalidField, ErrorCode::UnknownAction, ErrorCode::TooLarge,
        ErrorCode::NotMember, ErrorCode::UnknownGroup, ErrorCode::NameTaken,
        ErrorCode::NotFound, ErrorCode::IdConflict, ErrorCode::LimitReached,
        ErrorCode::RateLimited, ErrorCode::Forbidden, ErrorCode::Banned,
        ErrorCode::NotInvited, ErrorCode::UnknownUser, ErrorCode::Internal,
    ]), message in "\\PC{0,40}") {
        let e = WireError::new(code, message);
        let back = decode_reply::<Empty>(&encode_error(&e)).expect("frames");
        prop_assert_eq!(back, Err(e));
    }
}
