//! WebSocket close status codes (RFC 6455 §7.4 and the IANA registry).
//!
//! Kept apart from the frame codec because both the deframer (validating a
//! peer's Close) and the connection driver (choosing why *we* close) need
//! the same names, and neither should spell raw numbers.

/// Normal closure: the purpose of the connection was fulfilled.
pub const NORMAL: u16 = 1000;
/// The endpoint is going away (server shutdown, browser tab closed).
pub const GOING_AWAY: u16 = 1001;
/// The peer broke the framing rules.
pub const PROTOCOL_ERROR: u16 = 1002;
/// The peer sent a kind of data we do not accept (e.g. text where only binary is allowed).
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A text message or close reason was not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Generic "you broke a rule of this server" (e.g. authorisation).
pub const POLICY_VIOLATION: u16 = 1008;
/// A frame or message exceeded our limits.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The server hit an unexpected condition.
pub const INTERNAL_ERROR: u16 = 1011;
/// The server is restarting; the client should reconnect (used when draining).
pub const SERVICE_RESTART: u16 = 1012;
/// Temporary overload; the client should retry later.
pub const TRY_AGAIN_LATER: u16 = 1013;

/// Whether `code` may appear in a Close frame on the wire.
///
/// 1004 is reserved, 1005/1006/1015 are local-only pseudo codes that RFC 6455
/// forbids sending, everything below 1000 and in 1016..=2999 is unassigned or
/// reserved for future RFCs, and 5000+ is outside the defined range. 3000..=3999
/// is IANA-registered for libraries/frameworks and 4000..=4999 is private use
/// (Pusher's 4000–4399 live there), so both are accepted.
pub fn is_valid_on_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_codes_are_valid() {
        for code in [
            NORMAL,
            GOING_AWAY,
            PROTOCOL_ERROR,
            UNSUPPORTED_DATA,
            INVALID_PAYLOAD,
            POLICY_VIOLATION,
            MESSAGE_TOO_BIG,
            INTERNAL_ERROR,
            SERVICE_RESTART,
            TRY_AGAIN_LATER,
        ] {
            assert!(is_valid_on_wire(code), "{code}");
        }
    }

    #[test]
    fn reserved_and_local_codes_are_invalid() {
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            assert!(!is_valid_on_wire(code), "{code}");
        }
    }

    #[test]
    fn application_ranges_are_valid() {
        for code in [3000, 3999, 4000, 4200, 4999] {
            assert!(is_valid_on_wire(code), "{code}");
        }
    }
}
