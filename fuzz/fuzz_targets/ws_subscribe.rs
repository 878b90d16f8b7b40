//! The websocket subscription message of `/api/v1/live`
//! (`web::live::parse_request`): never panics; an accepted subscription
//! names only valid device ids; every refusal is answered with a JSON
//! `{"type":"error"}` message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use widgetry_proto::validate::validate_device;
use widgetry_server::web::live::parse_request;

fuzz_target!(|data: &[u8]| {
    // Websocket text frames are UTF-8 (axum refuses others).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(text) {
        Ok(sub) => {
            for d in sub.devices.iter().flatten() {
                validate_device(d).expect("an accepted device id validates");
            }
            // What was accepted is a JSON object.
            let v: serde_json::Value = serde_json::from_str(text).expect("accepted text is JSON");
            assert!(v.get("subscribe").is_some());
        }
        Err(e) => {
            let msg: serde_json::Value =
                serde_json::from_str(&e.message()).expect("the error message is JSON");
            assert_eq!(msg["type"], "error");
            assert!(msg["message"].is_string());
        }
    }
});
