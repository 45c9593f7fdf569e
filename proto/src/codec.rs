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

use crate::action::{tagged_body, Action, Call, ServerRequest};
use crate::wire::{ErrorCode, WireError, PROTOCOL};

/// The deepest nesting of JSON arrays and objects a request body may have: 128, serde_json's
/// own recursion limit for typed values. A body nested deeper gets `invalid_json`, so no
/// reader (Python's `json` stops near 1,000 levels) ever fails on a stored message.
pub const MAX_JSON_DEPTH: usize = 128;

/// The most frames a server accepts before the envelope's delimiter (8): the routing id
/// its ROUTER adds, and the frames the client put there itself (a tag to match replies,
/// PROTOCOL §2). A message with more is answered `bad_frames`.
pub const MAX_ENVELOPE_FRAMES: usize = 8;

/// The longest envelope frame a server accepts, in bytes (255, libzmq's longest routing
/// id). A message with a longer one is answered `bad_frames`.
pub const MAX_ENVELOPE_FRAME_BYTES: usize = 255;

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
    /// The envelope is past a server's bounds ([`MAX_ENVELOPE_FRAMES`] frames before the
    /// delimiter, each at most [`MAX_ENVELOPE_FRAME_BYTES`]).
    #[error(
        "envelope of {frames} frames, the longest {longest} bytes: at most {} frames of at most {} bytes each before the delimiter",
        MAX_ENVELOPE_FRAMES,
        MAX_ENVELOPE_FRAME_BYTES
    )]
    Envelope {
        /// Frames before the delimiter (the routing id included).
        frames: usize,
        /// The longest of them, in bytes.
        longest: usize,
    },
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
    /// The `action` exists but another kind of server answers it (checked before any other
    /// field is read).
    #[error("{action} is a {served_by} action, not a {here} action")]
    WrongRole {
        /// The action's wire name.
        action: &'static str,
        /// The role that serves it.
        served_by: &'static str,
        /// The role that received it.
        here: &'static str,
    },
}

impl CodecError {
    /// The wire error this decode failure is answered with.
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            CodecError::NoDelimiter { .. }
            | CodecError::FrameCount(_)
            | CodecError::Envelope { .. } => ErrorCode::BadFrames,
            CodecError::Signature(_) => ErrorCode::UnsupportedVersion,
            CodecError::Json(_) => ErrorCode::InvalidJson,
            CodecError::Field(_) => ErrorCode::InvalidField,
            CodecError::UnknownAction(_) | CodecError::WrongRole { .. } => ErrorCode::UnknownAction,
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

/// Checks what serde_json does not when it skips members it does not read: the whole body is
/// UTF-8 (RFC 8259 §8.1), and nested at most [`MAX_JSON_DEPTH`] deep.
fn check_body(body: &[u8]) -> Result<(), CodecError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(CodecError::Json(format!("the body is not UTF-8: {e}")));
    }
    if nesting_exceeds(body, MAX_JSON_DEPTH) {
        return Err(CodecError::Json(format!(
            "JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    Ok(())
}

/// Whether `[` and `{` outside strings nest deeper than `limit`. Only counts: the syntax is
/// serde_json's to check.
fn nesting_exceeds(json: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Decodes the frames after the envelope into a request of role `R` (the registry's, a
/// group node's or a key endpoint's request enum).
///
/// Checks, in order: two frames, the signature, UTF-8 and nesting ([`MAX_JSON_DEPTH`]), JSON
/// syntax, a JSON object, `action` present and a string, a known action, an action of role
/// `R`, and only then the action's fields (unknown members are ignored).
///
/// # Errors
/// [`CodecError::FrameCount`], [`CodecError::Signature`], [`CodecError::Json`] (syntax, not
/// UTF-8, too deep), [`CodecError::UnknownAction`], [`CodecError::WrongRole`] and
/// [`CodecError::Field`] (not an object, `action` missing or not a string, a field missing or
/// invalid: the message starts with the field's path, as in `members: invalid type…`).
pub fn decode_request<R: ServerRequest>(frames: &[Vec<u8>]) -> Result<R, CodecError> {
    #[derive(Deserialize)]
    struct Head {
        action: Option<serde_json::Value>,
    }
    let body = body_frame(frames)?;
    check_body(body)?;
    // serde also fills a struct from a JSON array; a request must be an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        parse::<serde::de::IgnoredAny>(body)?;
        return Err(CodecError::Field("request must be a JSON object".into()));
    }
    let head: Head = parse(body)?;
    let action = match head.action {
        Some(serde_json::Value::String(a)) => a,
        Some(_) => return Err(CodecError::Field("action: must be a string".into())),
        None => return Err(CodecError::Field("missing field `action`".into())),
    };
    let Some(action) =
        Action::from_wire_in(&action, R::ROLE).or_else(|| Action::from_wire(&action))
    else {
        return Err(CodecError::UnknownAction(action.chars().take(64).collect()));
    };
    match R::from_body(action, body) {
        Some(Ok(request)) => Ok(request),
        Some(Err(e)) => Err(match (json_error(&e), R::field_path(action, body)) {
            (CodecError::Field(_), Some(path)) => CodecError::Field(format!("{path}: {e}")),
            (other, _) => other,
        }),
        None => Err(CodecError::WrongRole {
            action: action.as_str(),
            served_by: action.role().as_str(),
            here: R::ROLE.as_str(),
        }),
    }
}

/// Decodes a request that may carry data: `[signature, body]`, or `[signature, body, data]`
/// for an action whose request carries data ([`Action::request_has_data`], `upload_chunk`).
/// Returns the request and its data frame.
///
/// # Errors
/// As [`decode_request`]; [`CodecError::FrameCount`] for a third frame on another action,
/// or none on `upload_chunk`.
pub fn decode_request_data<R: ServerRequest>(
    mut frames: Frames,
) -> Result<(R, Option<Vec<u8>>), CodecError> {
    let data = (frames.len() == 3).then(|| frames.pop()).flatten();
    let request: R = match decode_request(&frames) {
        Ok(request) => request,
        // Three frames are a frame-count error first, unless the body names an action
        // that takes data (then its own error is the answer).
        Err(e) if data.is_some() && !names_data_action(&frames[1]) => {
            let _ = e;
            return Err(CodecError::FrameCount(3));
        }
        Err(e) => return Err(e),
    };
    match (request.action().request_has_data(), data) {
        (true, Some(data)) => Ok((request, Some(data))),
        (false, None) => Ok((request, None)),
        (true, None) => Err(CodecError::FrameCount(2)),
        (false, Some(_)) => Err(CodecError::FrameCount(3)),
    }
}

/// Whether `body` is a JSON object whose `action` takes a data frame.
fn names_data_action(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Head {
        action: Option<String>,
    }
    serde_json::from_slice::<Head>(body)
        .ok()
        .and_then(|h| h.action)
        .and_then(|a| Action::from_wire(&a))
        .is_some_and(Action::request_has_data)
}

/// Encodes a typed call's request and its data frame: `[signature, body, data]`.
pub fn encode_call_data<C: Call>(request: &C::Request, data: Vec<u8>) -> Frames {
    vec![PROTOCOL.to_vec(), tagged_body(C::ACTION, request), data]
}

/// Encodes a typed call's request as its two frames (signature, JSON body with `action`).
pub fn encode_call<C: Call>(request: &C::Request) -> Frames {
    vec![PROTOCOL.to_vec(), tagged_body(C::ACTION, request)]
}

/// Encodes a role's request enum as its two frames (signature, JSON body with `action`).
pub fn encode_request<R: ServerRequest>(request: &R) -> Frames {
    vec![PROTOCOL.to_vec(), request.to_body()]
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

/// Encodes a successful reply with a data frame after the body (`download`).
pub fn encode_ok_data<T: Serialize>(body: &T, data: Vec<u8>) -> Frames {
    let mut frames = encode_ok(body);
    frames.push(data);
    frames
}

/// Decodes a reply that carries a data frame after its body (`download`): the reply's
/// fields and the data, or the server's error (which has no data frame).
///
/// # Errors
/// [`CodecError::FrameCount`] for a success without exactly one data frame; as
/// [`decode_reply`] otherwise.
pub fn decode_reply_data<T: DeserializeOwned>(
    frames: &[Vec<u8>],
) -> Result<Result<(T, Vec<u8>), WireError>, CodecError> {
    match frames {
        [signature, body, data] => {
            Ok(decode_reply::<T>(&[signature.clone(), body.clone()])?.map(|t| (t, data.clone())))
        }
        _ => match decode_reply::<T>(frames)? {
            Ok(_) => Err(CodecError::FrameCount(frames.len())),
            Err(e) => Ok(Err(e)),
        },
    }
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
    use crate::action::{KeyRequest, NodeRequest, RegistryRequest, Role};
    use crate::time::Timestamp;
    use crate::wire::{
        GroupName, MessagesPage, SendAck, SendRequest, UserName, MAX_PAGE_LIMIT, PROTOCOL as SIG,
    };
    use serde_json::value::RawValue;

    fn frames(body: &str) -> Frames {
        vec![SIG.to_vec(), body.as_bytes().to_vec()]
    }

    fn err(body: &str) -> CodecError {
        decode_request::<NodeRequest>(&frames(body)).expect_err("must fail")
    }

    /// Decodes with the request enum of `action`'s role and returns the action decoded, after
    /// encoding it again and decoding that.
    fn round_trip(body: &str, action: Action) -> Action {
        fn via<R: ServerRequest>(f: &Frames) -> Action {
            let req = decode_request::<R>(f).expect("decode");
            let again = decode_request::<R>(&encode_request(&req)).expect("re-decode");
            assert_eq!(again.action(), req.action());
            req.action()
        }
        let f = frames(body);
        match action.role() {
            Role::Registry => via::<RegistryRequest>(&f),
            Role::Node => via::<NodeRequest>(&f),
            Role::KeyEndpoint => via::<KeyRequest>(&f),
        }
    }

    #[test]
    fn send_round_trips_with_raw_body() {
        let orig = SendRequest {
            group: Some(GroupName::new("Cool Group").expect("name")),
            user: UserName::new("alice").expect("name"),
            body: RawValue::from_string(r#"{"t":[1,2.5,true,null,"x"]}"#.into()).expect("raw"),
            id: Some(crate::id::MessageId::new_v7()),
            attachment: None,
        };
        let wire = encode_call::<crate::action::call::Send>(&orig);
        let NodeRequest::Send(back) = decode_request::<NodeRequest>(&wire).expect("decode") else {
            panic!("wrong action");
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
            r#"{"action":"upload","user":"a","sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0}"#,
            r#"{"action":"upload_chunk","user":"a","sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","offset":0}"#,
            r#"{"action":"upload_status","user":"a","sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}"#,
            r#"{"action":"download","user":"a","sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","offset":0}"#,
            r#"{"action":"multicast","to":["bob","carol"],"body":"hi"}"#,
            r#"{"action":"broadcast","body":"hi all"}"#,
            r#"{"action":"block","name":"mallory"}"#,
            r#"{"action":"unblock","name":"mallory"}"#,
            r#"{"action":"blocked"}"#,
            r#"{"action":"owner","name":"Cool Group"}"#,
            r#"{"action":"release","name":"Cool Group"}"#,
            r#"{"action":"register_groups","endpoint":"tcp://127.0.0.1:1","groups":[{"name":"g","members":2}]}"#,
            r#"{"action":"heartbeat_host","endpoint":"tcp://127.0.0.1:1","groups":1}"#,
            r#"{"action":"create","group":"g","user":"a","mode":"private"}"#,
            r#"{"action":"delete","group":"g","user":"a"}"#,
            r#"{"action":"renew","user":"a","groups":[{"group":"g","acked_seq":3},{"group":"h"}]}"#,
            // The node's `stop` and the registry's: one wire name in two roles.
            r#"{"action":"stop","user":"a"}"#,
        ];
        let mut checked = 0;
        for body in bodies {
            let head: serde_json::Value = serde_json::from_str(body).expect("json");
            let name = head["action"].as_str().expect("action");
            for action in Action::ALL.iter().copied().filter(|a| a.as_str() == name) {
                assert_eq!(round_trip(body, action), action, "{body}");
                checked += 1;
            }
        }
        assert_eq!(checked, Action::ALL.len(), "every action");
    }

    #[test]
    fn an_error_names_its_group_only_when_given_one() {
        let plain = WireError::new(ErrorCode::UnknownGroup, "no such group here");
        let text = serde_json::to_string(&plain).expect("json");
        assert!(!text.contains(r#""group":"#), "{text}");
        let named = plain.with_group(Some("Ops".parse().expect("name")));
        let text = serde_json::to_string(&named).expect("json");
        assert!(text.contains(r#""group":"Ops""#), "{text}");
        let back: WireError = serde_json::from_str(&text).expect("decodes");
        assert_eq!(back, named);
        // From an older node: no group.
        let old: WireError =
            serde_json::from_str(r#"{"error":"not_member","message":"m"}"#).expect("decodes");
        assert_eq!(old.group, None);
    }

    #[test]
    fn bad_frames_get_exact_errors() {
        let fail = |f: Frames| decode_request::<NodeRequest>(&f).expect_err("must fail");
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
        let not_utf8 =
            decode_request::<NodeRequest>(&[SIG.to_vec(), vec![0xff, 0xfe]]).expect_err("fails");
        assert_eq!(not_utf8.to_wire().code, ErrorCode::InvalidJson);
        assert!(matches!(err("[1,2]"), CodecError::Field(_)));
        assert_eq!(
            err("{}"),
            CodecError::Field("missing field `action`".into())
        );
        assert_eq!(
            err(r#"{"action":7}"#),
            CodecError::Field("action: must be a string".into())
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
        let Ok(NodeRequest::Subscribe(r)) = decode_request::<NodeRequest>(&frames(
            r#"{"action":"subscribe","user":"a","batch":true,"acked_seq":41}"#,
        )) else {
            panic!("a subscribe");
        };
        assert_eq!((r.batch, r.acked_seq), (true, Some(41)));
        // The AGORA/1.0 form still decodes: no batches, no ack.
        let Ok(NodeRequest::Subscribe(r)) =
            decode_request::<NodeRequest>(&frames(r#"{"action":"subscribe","user":"a"}"#))
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

    #[test]
    fn only_upload_chunk_carries_a_data_frame() {
        let chunk = format!(
            r#"{{"action":"upload_chunk","user":"a","sha256":"{}","offset":0}}"#,
            "0".repeat(64)
        );
        let with = |body: &str, data: Option<&[u8]>| {
            let mut f = frames(body);
            f.extend(data.map(<[u8]>::to_vec));
            decode_request_data::<NodeRequest>(f)
        };
        let (req, data) = with(&chunk, Some(b"bytes")).expect("a chunk with its bytes");
        assert_eq!(req.action(), Action::UploadChunk);
        assert_eq!(data.as_deref(), Some(&b"bytes"[..]));
        assert_eq!(
            with(&chunk, None).map(|_| ()),
            Err(CodecError::FrameCount(2))
        );
        assert_eq!(
            with(r#"{"action":"info"}"#, Some(b"x")).map(|_| ()),
            Err(CodecError::FrameCount(3))
        );
        let ok = encode_ok_data(&serde_json::json!({"n": 1}), b"data".to_vec());
        let (v, bytes) = decode_reply_data::<serde_json::Value>(&ok)
            .expect("frames")
            .expect("ok");
        assert_eq!((v["n"].as_u64(), bytes.as_slice()), (Some(1), &b"data"[..]));
    }

    #[test]
    fn another_roles_action_is_unknown_before_its_fields_are_read() {
        // `send_dm` without any of its fields: the role is checked first.
        let e = err(r#"{"action":"send_dm"}"#);
        assert_eq!(
            e,
            CodecError::WrongRole {
                action: "send_dm",
                served_by: "registry",
                here: "group-node"
            }
        );
        assert_eq!(e.to_wire().code, ErrorCode::UnknownAction);
        let e = decode_request::<RegistryRequest>(&frames(r#"{"action":"get_messages"}"#))
            .expect_err("a node action");
        assert_eq!(e.to_wire().code, ErrorCode::UnknownAction);
        assert_eq!(
            e.to_string(),
            "get_messages is a group-node action, not a registry action"
        );
        let e = decode_request::<KeyRequest>(&frames(r#"{"action":"list"}"#)).expect_err("no");
        assert_eq!(e.to_wire().code, ErrorCode::UnknownAction);
    }

    #[test]
    fn the_whole_body_must_be_utf8_even_where_unread() {
        let mut body = br#"{"action":"info","x":""#.to_vec();
        body.extend_from_slice(&[0xc3, 0x28]); // an invalid two-byte sequence
        body.extend_from_slice(br#""}"#);
        let e = decode_request::<NodeRequest>(&[SIG.to_vec(), body]).expect_err("not UTF-8");
        assert_eq!(e.to_wire().code, ErrorCode::InvalidJson);
    }

    #[test]
    fn nesting_is_limited_to_the_documented_depth() {
        let nested = |depth: usize| {
            format!(
                r#"{{"action":"send","user":"a","body":{}1{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        // The request object itself is one level.
        assert!(decode_request::<NodeRequest>(&frames(&nested(MAX_JSON_DEPTH - 1))).is_ok());
        let e = err(&nested(MAX_JSON_DEPTH));
        assert_eq!(e.to_wire().code, ErrorCode::InvalidJson, "{e}");
        let e = err(&nested(100_000));
        assert_eq!(e.to_wire().code, ErrorCode::InvalidJson);
        // Brackets inside strings do not count, escaped quotes do not end a string.
        let text = format!(
            r#"{{"action":"send","user":"a","body":"\"{}"}}"#,
            "[".repeat(500)
        );
        assert!(decode_request::<NodeRequest>(&frames(&text)).is_ok());
    }

    #[test]
    fn field_errors_name_their_field() {
        for (body, field) in [
            (
                r#"{"action":"get_messages","user":"a","since":"10:00:00x"}"#,
                "since",
            ),
            (
                r#"{"action":"set_mode","user":"a","mode":"secret"}"#,
                "mode",
            ),
            (
                r#"{"action":"get_messages","user":"a","limit":"two"}"#,
                "limit",
            ),
            (r#"{"action":"join","user":"no spaces allowed"}"#, "user"),
        ] {
            let e = err(body);
            assert_eq!(e.to_wire().code, ErrorCode::InvalidField, "{body}");
            assert!(
                e.to_string().starts_with(&format!("{field}: ")),
                "{body}: {e}"
            );
        }
        let e =
            decode_request::<RegistryRequest>(&frames(r#"{"action":"connect","status":"busy"}"#))
                .expect_err("bad status");
        assert!(e.to_string().starts_with("status: "), "{e}");
        let e = decode_request::<RegistryRequest>(&frames(
            r#"{"action":"register","name":"g","endpoint":"tcp://127.0.0.1:1","members":"two"}"#,
        ))
        .expect_err("bad members");
        assert!(e.to_string().starts_with("members: "), "{e}");
    }
}
