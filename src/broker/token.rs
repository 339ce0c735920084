//! The `operation` string handed out with a 202: it names the operation and the target
//! that runs it, so `last_operation` can be answered from the token alone where no record
//! says more. Opaque to clients; always well under the platform's 10,000 characters.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::OsbError;
use crate::store::OpKind;

const PREFIX: &str = "bkg1.";
/// Cloud Controller stores at most 10,000 characters.
pub const MAX_LEN: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationToken {
    /// Who runs the operation: `local`, or an upstream's alias.
    #[serde(rename = "t")]
    pub target: String,
    #[serde(rename = "k")]
    pub kind: OpKind,
    /// The operation's id in its record.
    #[serde(rename = "o")]
    pub id: String,
    /// The upstream's own `operation`, when it gave one and it fits.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

impl OperationToken {
    pub const LOCAL: &'static str = "local";
    /// The operation id of tokens for operations no record tracks.
    pub const UNRECORDED: &'static str = "unrecorded";

    pub fn local(kind: OpKind, id: &str) -> Self {
        OperationToken {
            target: Self::LOCAL.into(),
            kind,
            id: id.to_string(),
            upstream: None,
        }
    }

    /// Encodes the token; an upstream operation too long to fit is left to the record.
    pub fn encode(&self) -> String {
        let text = Self::encode_raw(self);
        if text.len() <= MAX_LEN {
            return text;
        }
        Self::encode_raw(&OperationToken {
            upstream: None,
            ..self.clone()
        })
    }

    fn encode_raw(token: &OperationToken) -> String {
        let json = serde_json::to_vec(token).expect("tokens serialize");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn decode(text: &str) -> Result<Self, OsbError> {
        let bad = || OsbError::BadRequest("operation is not one this broker handed out".into());
        if text.len() > MAX_LEN {
            return Err(bad());
        }
        let body = text.strip_prefix(PREFIX).ok_or_else(bad)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad())?;
        serde_json::from_slice(&json).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_foreign_tokens() {
        let token = OperationToken::local(OpKind::Bind, "0123456789abcdef");
        let text = token.encode();
        assert!(text.len() < 200);
        assert_eq!(OperationToken::decode(&text).unwrap(), token);
        for bad in [
            "",
            "x",
            "bkg1.",
            "bkg1.!!!",
            "bkg1.e30",
            &"a".repeat(MAX_LEN + 1),
        ] {
            assert!(OperationToken::decode(bad).is_err(), "{bad}");
        }
        let long = OperationToken {
            target: "east".into(),
            upstream: Some("x".repeat(9_000)),
            ..token
        };
        let text = long.encode();
        assert!(text.len() <= MAX_LEN);
        assert_eq!(OperationToken::decode(&text).unwrap().upstream, None);
    }
}
