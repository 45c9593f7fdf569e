//! ZeroMQ frames to and from protocol values.
//!
//! # Format
//! A request, as a REQ socket sends it, is two frames:
//!
//! | frame | content |
//! |---|---|
//! | 0 | [`PROTOCOL`] signature, `AGORA/1` |
//! | 1 | the JSON request object, UTF-8 |
//!
//! A ROUTER sees the REQ envelope in front: one or more identity frames and an empty
//! delimiter frame (zguide chapter 3, "The Extended Reply Envelope"). [`split_envelope`]
//! takes it off once; the reply goes back behind the same envelope. Replies have the same two
//! frames. Frames after the body are reserved for binary attachments and are rejected for now.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::wire::{
    Action, ErrorCode, GetMessagesRequest, InfoRequest, KeyTargetRequest, ListRequest,
    LookupRequest, MemberTargetRequest, MembersRequest, MembershipRequest, RegisterRequest,
    Request, SendRequest, SetModeRequest, UnregisterRequest, WireError, PROTOCOL,
};

/// A ZeroMQ multipart message: a list of frames.
pub type Frames = Vec<Vec<u8>>;

/// Why frames could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A ROUTER message had no empty delimiter frame: there is no envelope to reply to.
    #[error("no envelope delimiter in {frames} frames")]
    NoDelimiter {
        /// How many frames arrived.
        frames: usize,
    },
    /// Not exactly two frames after the envelope.
    #[error("expected 2 frames (signature, body), got {0}")]
    FrameCount(usize),
    /// The signature frame is not [`PROTOCOL`].
    #[error("unsupported protocol signature {0:?}, expected AGORA/1")]
    Signature(String),
    /// The body is not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// The body is JSON but not a request: not an object, missing or invalid fields.
    #[error("{0}")]
    Field(String),
    /// The `action` is not one this protocol has.
    #[error("unknown action {0:?}")]
    UnknownAction(String),
}

impl CodecError {
    /// The wire error this decode failure is answered with.
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            CodecError::NoDelimiter { .. } | CodecError::FrameCount(_) => ErrorCode::BadFrames,
            CodecError::Signature(_) => ErrorCode::UnsupportedVersion,
            CodecError::Json(_) => ErrorCode::InvalidJson,
            CodecError::Field(_) => ErrorCode::InvalidField,
            CodecError::UnknownAction(_) => ErrorCode::UnknownAction,
        };
        WireError::new(code, self.to_string())
    }
}

/// Splits a ROUTER message into its envelope (identity frames plus the empty delimiter) and
/// the frames after it.
///
/// # Errors
/// [`CodecError::NoDelimiter`] if no frame is empty: the sender is not a REQ-style peer and
/// cannot be answered.
pub fn split_envelope(mut frames: Frames) -> Result<(Frames, Frames), CodecError> {
    let Some(delimiter) = frames.iter().position(Vec::is_empty) else {
        return Err(CodecError::NoDelimiter {
            frames: frames.len(),
        });
    };
    let body = frames.split_off(delimiter + 1);
    Ok((frames, body))
}

/// Checks the signature frame and returns the JSON body frame.
fn body_frame(frames: &[Vec<u8>]) -> Result<&[u8], CodecError> {
    let [signature, body] = frames else {
        return Err(CodecError::FrameCount(frames.len()));
    };
    if signature.as_slice() != PROTOCOL {
        return Err(CodecError::Signature(
            String::from_utf8_lossy(signature)
                .chars()
                .take(32)
                .collect(),
        ));
    }
    Ok(body)
}

fn json_error(e: &serde_json::Error) -> CodecError {
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            CodecError::Json(e.to_string())
        }
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            CodecError::Field(e.to_string())
        }
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    serde_json::from_slice(body).map_err(|e| json_error(&e))
}

/// Decodes the frames after the envelope into a request.
///
/// The body is parsed twice: once for its `action`, then into that action's type (which
/// ignores unknown members).
///
/// # Errors
/// [`CodecError::FrameCount`], [`CodecError::Signature`], [`CodecError::Json`] (syntax,
/// not UTF-8), [`CodecError::Field`] (not an object, `action` missing or not a string, a
/// field missing or invalid) and [`CodecError::UnknownAction`].
pub fn decode_request(frames: &[Vec<u8>]) -> Result<Request, CodecError> {
    #[derive(Deserialize)]
    struct Head {
        action: Option<serde_json::Value>,
    }
    let body = body_frame(frames)?;
    // serde also fills a struct from a JSON array; a request must be an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        parse::<serde::de::IgnoredAny>(body)?;
        return Err(CodecError::Field("request must be a JSON object".into()));
    }
    let head: Head = parse(body)?;
    let action = match head.action {
        Some(serde_json::Value::String(a)) => a,
        Some(_) => return Err(CodecError::Field("action must be a string".into())),
        None => return Err(CodecError::Field("missing field `action`".into())),
    };
    let Some(action) = Action::from_wire(&action) else {
        return Err(CodecError::UnknownAction(action.chars().take(64).collect()));
    };
    Ok(match action {
        Action::Register => Request::Register(parse::<RegisterRequest>(body)?),
        Action::Unregister => Request::Unregister(parse::<UnregisterRequest>(body)?),
        Action::List => Request::List(parse::<ListRequest>(body)?),
        Action::Lookup => Request::Lookup(parse::<LookupRequest>(body)?),
        Action::Info => Request::Info(parse::<InfoRequest>(body)?),
        Action::Join => Request::Join(parse::<MembershipRequest>(body)?),
        Action::Leave => Request::Leave(parse::<MembershipRequest>(body)?),
        Action::Members => Request::Members(parse::<MembersRequest>(body)?),
        Action::Send => Request::Send(parse::<SendRequest>(body)?),
        Action::GetMessages => Request::GetMessages(parse::<GetMessagesRequest>(body)?),
        Action::Subscribe => Request::Subscribe(parse::<crate::wire::SubscribeRequest>(body)?),
        Action::Unsubscribe => Request::Unsubscribe(parse::<MembershipRequest>(body)?),
        Action::Invite => Request::Invite(parse::<KeyTargetRequest>(body)?),
        Action::Kick => Request::Kick(parse::<MemberTargetRequest>(body)?),
        Action::Ban => Request::Ban(parse::<KeyTargetRequest>(body)?),
        Action::Unban => Request::Unban(parse::<KeyTargetRequest>(body)?),
        Action::Promote => Request::Promote(parse::<MemberTargetRequest>(body)?),
        Action::SetMode => Request::SetMode(parse::<SetModeRequest>(body)?),
        Action::ServerKey => Request::ServerKey(parse::<crate::wire::ServerKeyRequest>(body)?),
        Action::UserRegister => Request::UserRegister(parse::<crate::wire::UserNameRequest>(body)?),
        Action::UserUnregister => {
            Request::UserUnregister(parse::<crate::wire::UserUnregisterRequest>(body)?)
        }
        Action::Users => Request::Users(parse::<ListRequest>(body)?),
        Action::Whois => Request::Whois(parse::<crate::wire::UserNameRequest>(body)?),
        Action::Connect => Request::Connect(parse::<crate::wire::ConnectRequest>(body)?),
        Action::Disconnect => Request::Disconnect(parse::<ListRequest>(body)?),
        Action::SendDm => Request::SendDm(parse::<crate::wire::SendDmRequest>(body)?),
        Action::Mailbox => Request::Mailbox(parse::<crate::wire::MailboxRequest>(body)?),
        Action::AckDm => Request::AckDm(parse::<crate::wire::AckDmRequest>(body)?),
        Action::DeadLetters => Request::DeadLetters(parse::<ListRequest>(body)?),
    })
}

#[derive(Serialize)]
struct Tagged<'a, T> {
    action: &'static str,
    #[serde(flatten)]
    inner: &'a T,
}

fn tagged<T: Serialize>(action: Action, inner: &T) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail.
    serde_json::to_vec(&Tagged {
        action: action.as_str(),
        inner,
    })
    .unwrap_or_default()
}

/// Encodes a request as its two frames (signature, JSON body).
pub fn encode_request(request: &Request) -> Frames {
    let action = request.action();
    let body = match request {
        Request::Register(r) => tagged(action, r),
        Request::Unregister(r) => tagged(action, r),
        Request::List(r) => tagged(action, r),
        Request::Lookup(r) => tagged(action, r),
        Request::Info(r) => tagged(action, r),
        Request::Join(r) | Request::Leave(r) | Request::Unsubscribe(r) => tagged(action, r),
        Request::Subscribe(r) => tagged(action, r),
        Request::Members(r) => tagged(action, r),
        Request::Send(r) => tagged(action, r),
        Request::Invite(r) | Request::Ban(r) | Request::Unban(r) => tagged(action, r),
        Request::Kick(r) | Request::Promote(r) => tagged(action, r),
        Request::SetMode(r) => tagged(action, r),
        Request::ServerKey(r) => tagged(action, r),
        Request::UserRegister(r) | Request::Whois(r) => tagged(action, r),
        Request::UserUnregister(r) => tagged(action, r),
        Request::Users(r) | Request::Disconnect(r) | Request::DeadLetters(r) => tagged(action, r),
        Request::SendDm(r) => tagged(action, r),
        Request::Mailbox(r) => tagged(action, r),
        Request::AckDm(r) => tagged(action, r),
        Request::Connect(r) => tagged(action, r),
        Request::GetMessages(r) => tagged(action, r),
    };
    vec![PROTOCOL.to_vec(), body]
}

#[derive(Serialize)]
struct OkReply<'a, T> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct ErrReply<'a> {
    ok: bool,
    #[serde(flatten)]
    error: &'a WireError,
}

/// Encodes a successful reply as its two frames: `{"ok": true, …fields of body}`.
pub fn encode_ok<T: Serialize>(body: &T) -> Frames {
    let json = serde_json::to_vec(&OkReply { ok: true, body }).unwrap_or_default();
    vec![PROTOCOL.to_vec(), json]
}

/// Encodes an error reply as its two frames: `{"ok": false, "error": CODE, "message": …}`.
pub fn encode_error(error: &WireError) -> Frames {
    let json = serde_json::to_vec(&ErrReply { ok: false, error }).unwrap_or_default();
    vec![PROTOCOL.to_vec(), json]
}

/// Decodes a reply's frames into the action's reply type, or the server's error.
///
/// # Errors
/// The outer error is a [`CodecError`] when the frames are not a well-formed reply of type
/// `T`; the inner `Err` is the server's [`WireError`].
pub fn decode_reply<T: DeserializeOwned>(
    frames: &[Vec<u8>],
) -> Result<Result<T, WireError>, CodecError> {
    #[derive(Deserialize)]
    struct Head {
        ok: bool,
    }
    let body = body_frame(frames)?;
    // One pass over a success reply as servers encode it (`ok` first, no whitespace): a
    // page of 1000 messages is about 260 KB, and reading `ok` first would scan it twice.
    if body.starts_with(br#"{"ok":true,"#) {
        return Ok(Ok(parse::<T>(body)?));
    }
    let head: Head = parse(body)?;
    if head.ok {
        Ok(Ok(parse::<T>(body)?))
    } else {
        Ok(Err(parse::<WireError>(body)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;
    use crate::wire::{
        GroupName, MessagesPage, SendAck, UserName, MAX_PAGE_LIMIT, PROTOCOL as SIG,
    };
    use serde_json::value::RawValue;

    fn frames(body: &str) -> Frames {
        vec![SIG.to_vec(), body.as_bytes().to_vec()]
    }

    fn err(body: &str) -> CodecError {
        decode_request(&frames(body)).expect_err("must fail")
    }

    #[test]
    fn send_round_trips_with_raw_body() {
        let req = Request::Send(SendRequest {
            group: Some(GroupName::new("Cool Group").expect("name")),
            user: UserName::new("alice").expect("name"),
            body: RawValue::from_string(r#"{"t":[1,2.5,true,null,"x"]}"#.into()).expect("raw"),
            id: Some(crate::id::MessageId::new_v7()),
        });
        let wire = encode_request(&req);
        let Request::Send(back) = decode_request(&wire).expect("decode") else {
            panic!("wrong action");
        };
        let Request::Send(orig) = req else {
            unreachable!()
        };
        assert_eq!(back.body.get(), orig.body.get());
        assert_eq!(back.id, orig.id);
        assert_eq!(back.group, orig.group);
    }

    #[test]
    fn every_action_decodes_from_its_wire_name() {
        let bodies = [
            r#"{"action":"register","name":"g","endpoint":"tcp://127.0.0.1:1"}"#,
            r#"{"action":"unregister","name":"g","endpoint":"tcp://127.0.0.1:1"}"#,
            r#"{"action":"list"}"#,
            r#"{"action":"lookup","name":"g"}"#,
            r#"{"action":"info"}"#,
            r#"{"action":"join","user":"a"}"#,
            r#"{"action":"leave","user":"a"}"#,
            r#"{"action":"members"}"#,
            r#"{"action":"send","user":"a","body":"hi"}"#,
            r#"{"action":"get_messages","user":"a","latest":5}"#,
            r#"{"action":"subscribe","user":"a"}"#,
            r#"{"action":"unsubscribe","user":"a","group":"g"}"#,
            r#"{"action":"invite","user":"a","key":"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"}"#,
            r#"{"action":"kick","user":"a","member":"b"}"#,
            r#"{"action":"ban","user":"a","key":"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"}"#,
            r#"{"action":"unban","user":"a","key":"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"}"#,
            r#"{"action":"promote","user":"a","member":"b"}"#,
            r#"{"action":"set_mode","user":"a","mode":"private"}"#,
            r#"{"action":"server_key"}"#,
            r#"{"action":"user_register","name":"alice"}"#,
            r#"{"action":"user_unregister","name":"alice","confirm":true}"#,
            r#"{"action":"users"}"#,
            r#"{"action":"whois","name":"alice"}"#,
            r#"{"action":"connect","status":"away"}"#,
            r#"{"action":"disconnect"}"#,
            r#"{"action":"send_dm","to":"bob","body":"hi"}"#,
            r#"{"action":"mailbox","after_n":2}"#,
            r#"{"action":"ack_dm","up_to":3}"#,
            r#"{"action":"dead_letters"}"#,
        ];
        for (body, action) in bodies.iter().zip(Action::ALL) {
            let req = decode_request(&frames(body)).expect(body);
            assert_eq!(req.action(), action);
            let again = decode_request(&encode_request(&req)).expect("re-decode");
            assert_eq!(again.action(), action);
        }
    }

    #[test]
    fn bad_frames_get_exact_errors() {
        let fail = |f: Frames| decode_request(&f).expect_err("must fail");
        assert_eq!(fail(vec![SIG.to_vec()]), CodecError::FrameCount(1));
        assert_eq!(
            fail(vec![SIG.to_vec(), b"{}".to_vec(), b"x".to_vec()]),
            CodecError::FrameCount(3)
        );
        assert_eq!(
            fail(vec![b"AGORA/2".to_vec(), b"{}".to_vec()]),
            CodecError::Signature("AGORA/2".into())
        );
        assert_eq!(
            fail(vec![b"AGORA/2".to_vec(), b"{}".to_vec()])
                .to_wire()
                .code,
            ErrorCode::UnsupportedVersion
        );
    }

    #[test]
    fn bad_json_and_fields_get_exact_codes() {
        assert!(matches!(err("{"), CodecError::Json(_)));
        assert!(matches!(err("\u{0}"), CodecError::Json(_)));
        let not_utf8 = decode_request(&[SIG.to_vec(), vec![0xff, 0xfe]]).expect_err("fails");
        assert_eq!(not_utf8.to_wire().code, ErrorCode::InvalidJson);
        assert!(matches!(err("[1,2]"), CodecError::Field(_)));
        assert_eq!(
            err("{}"),
            CodecError::Field("missing field `action`".into())
        );
        assert_eq!(
            err(r#"{"action":7}"#),
            CodecError::Field("action must be a string".into())
        );
        assert_eq!(
            err(r#"{"action":"explode"}"#),
            CodecError::UnknownAction("explode".into())
        );
        let missing = err(r#"{"action":"send","user":"a"}"#);
        assert!(
            matches!(&missing, CodecError::Field(m) if m.contains("missing field `body`")),
            "{missing:?}"
        );
        let bad_user = err(r#"{"action":"join","user":"no spaces allowed"}"#);
        assert_eq!(bad_user.to_wire().code, ErrorCode::InvalidField);
        let bad_time = err(r#"{"action":"get_messages","user":"a","since":"noon"}"#);
        assert_eq!(bad_time.to_wire().code, ErrorCode::InvalidField);
        let too_big = err(&format!(
            r#"{{"action":"get_messages","user":"a","limit":{}}}"#,
            u64::MAX
        ));
        assert_eq!(too_big.to_wire().code, ErrorCode::InvalidField);
        let _ = MAX_PAGE_LIMIT;
    }

    #[test]
    fn subscribe_takes_batch_and_ack_and_rejects_bad_ones() {
        let Ok(Request::Subscribe(r)) = decode_request(&frames(
            r#"{"action":"subscribe","user":"a","batch":true,"acked_seq":41}"#,
        )) else {
            panic!("a subscribe");
        };
        assert_eq!((r.batch, r.acked_seq), (true, Some(41)));
        // The AGORA/1.0 form still decodes: no batches, no ack.
        let Ok(Request::Subscribe(r)) =
            decode_request(&frames(r#"{"action":"subscribe","user":"a"}"#))
        else {
            panic!("a subscribe");
        };
        assert_eq!((r.batch, r.acked_seq), (false, None));
        for bad in [
            r#"{"action":"subscribe","user":"a","acked_seq":-1}"#,
            r#"{"action":"subscribe","user":"a","acked_seq":"7"}"#,
            r#"{"action":"subscribe","user":"a","batch":"yes"}"#,
        ] {
            assert_eq!(err(bad).to_wire().code, ErrorCode::InvalidField, "{bad}");
        }
    }

    #[test]
    fn envelope_split_keeps_identities_and_delimiter() {
        let msg = vec![
            b"id1".to_vec(),
            b"id2".to_vec(),
            vec![],
            SIG.to_vec(),
            b"{}".to_vec(),
        ];
        let (env, rest) = split_envelope(msg).expect("split");
        assert_eq!(env, vec![b"id1".to_vec(), b"id2".to_vec(), vec![]]);
        assert_eq!(rest, vec![SIG.to_vec(), b"{}".to_vec()]);
        assert_eq!(
            split_envelope(vec![b"id".to_vec(), b"x".to_vec()]),
            Err(CodecError::NoDelimiter { frames: 2 })
        );
    }

    #[test]
    fn replies_round_trip_ok_and_error() {
        let ack = SendAck {
            seq: 7,
            id: crate::id::MessageId::new_v7(),
            time: Timestamp::from_micros(1),
            duplicate: false,
        };
        let back: SendAck = decode_reply(&encode_ok(&ack)).expect("frames").expect("ok");
        assert_eq!(back, ack);
        let e = WireError::new(ErrorCode::NotMember, "bob is not a member of g");
        let back = decode_reply::<MessagesPage>(&encode_error(&e)).expect("frames");
        assert_eq!(back, Err(e));
    }
}
