//! Standard Webhooks signature verification: the published test vector, an independently
//! computed known answer, rotation, tolerance, malformed and hostile headers, and secrets
//! kept out of `Debug` and error messages.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use shotlabel_core::standard_webhooks::{
    DEFAULT_TOLERANCE_SECS, MAX_SIGNATURE_ENTRIES, MAX_SIGNATURE_HEADER_LEN, SecretError, Verified,
    VerifyError, WebhookSecrets, sign, verify,
};

/// The Standard Webhooks reference libraries' published test vector.
const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const VECTOR_TIMESTAMP: i64 = 1_614_265_330;
const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

/// The tests' own keys (32 bytes each) and a delivery shaped like OpenAI's.
const KEY_A: &[u8] = b"key A: thirty-two bytes exactly!";
const KEY_B: &[u8] = b"key B: a different 32-byte key..";
const ID: &str = "wh_685342f6f8c081908d8bd1a0a65b4e51";
const NOW: i64 = 1_750_000_000;
const BODY: &[u8] = br#"{"id":"evt_1","object":"event","created_at":1750000000,"type":"batch.completed","data":{"id":"batch_abc"}}"#;

fn whsec(key: &[u8]) -> String {
    format!("whsec_{}", STANDARD.encode(key))
}

fn secrets(keys: &[&[u8]]) -> WebhookSecrets {
    let configured: Vec<String> = keys.iter().map(|key| whsec(key)).collect();
    WebhookSecrets::parse(&configured.join(" ")).expect("valid secrets")
}

/// Verifies with the three headers given (None = absent), at `now`, default tolerance.
fn check(
    secrets: &WebhookSecrets,
    id: Option<&str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<Verified, VerifyError> {
    verify(
        secrets,
        |name| match name {
            "webhook-id" => id,
            "webhook-timestamp" => timestamp,
            "webhook-signature" => signature,
            _ => None,
        },
        body,
        now,
        DEFAULT_TOLERANCE_SECS,
    )
}

/// Verifies a delivery signed with `signature` at timestamp `NOW`, checked at `NOW`.
fn check_signature(secrets: &WebhookSecrets, signature: &str) -> Result<Verified, VerifyError> {
    check(
        secrets,
        Some(ID),
        Some(&NOW.to_string()),
        Some(signature),
        BODY,
        NOW,
    )
}

fn ok_verified() -> Result<Verified, VerifyError> {
    Ok(Verified {
        webhook_id: ID.to_owned(),
        timestamp: NOW,
    })
}

/// A well-formed `v1` entry that matches nothing (a MAC under an unrelated key).
fn decoy(n: u8) -> String {
    sign(&[n; 32], ID, NOW, BODY)
}

#[test]
fn the_published_test_vector_signs_and_verifies() {
    let key = STANDARD
        .decode(VECTOR_SECRET.trim_start_matches("whsec_"))
        .expect("vector key is base64");
    assert_eq!(
        sign(&key, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY),
        VECTOR_SIGNATURE
    );

    let secrets = WebhookSecrets::parse(VECTOR_SECRET).expect("vector secret");
    let verified = check(
        &secrets,
        Some(VECTOR_ID),
        Some("1614265330"),
        Some(VECTOR_SIGNATURE),
        VECTOR_BODY,
        VECTOR_TIMESTAMP + 10,
    )
    .expect("the published vector verifies");
    assert_eq!(
        verified,
        Verified {
            webhook_id: VECTOR_ID.to_owned(),
            timestamp: VECTOR_TIMESTAMP,
        }
    );
}

#[test]
fn a_known_answer_computed_directly_with_hmac_sha256_verifies() {
    // Raw bytes, not UTF-8: the body is signed exactly as received.
    let body: &[u8] = b"{\"a\":1}\n\xff\x00 trailing";
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY_A).expect("hmac key");
    mac.update(format!("{ID}.{NOW}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));

    assert_eq!(sign(KEY_A, ID, NOW, body), expected);
    assert_eq!(
        check(
            &secrets(&[KEY_A]),
            Some(ID),
            Some(&NOW.to_string()),
            Some(&expected),
            body,
            NOW
        ),
        ok_verified()
    );
}

#[test]
fn it_works_with_an_http_header_map() {
    let mut headers = http::HeaderMap::new();
    headers.insert("Webhook-Id", ID.parse().expect("header value"));
    headers.insert(
        "WEBHOOK-TIMESTAMP",
        NOW.to_string().parse().expect("header value"),
    );
    headers.insert(
        "webhook-signature",
        sign(KEY_A, ID, NOW, BODY).parse().expect("header value"),
    );
    let result = verify(
        &secrets(&[KEY_A]),
        |name| headers.get(name).and_then(|value| value.to_str().ok()),
        BODY,
        NOW,
        DEFAULT_TOLERANCE_SECS,
    );
    assert_eq!(result, ok_verified());
}

#[test]
fn a_tampered_body_id_or_timestamp_fails() {
    let secrets = secrets(&[KEY_A]);
    let signature = sign(KEY_A, ID, NOW, BODY);
    let ts = NOW.to_string();

    let mut body = BODY.to_vec();
    body[10] ^= 1;
    assert_eq!(
        check(&secrets, Some(ID), Some(&ts), Some(&signature), &body, NOW),
        Err(VerifyError::NoMatchingSignature)
    );
    let mut longer = BODY.to_vec();
    longer.push(b'\n');
    assert_eq!(
        check(
            &secrets,
            Some(ID),
            Some(&ts),
            Some(&signature),
            &longer,
            NOW
        ),
        Err(VerifyError::NoMatchingSignature)
    );
    assert_eq!(
        check(
            &secrets,
            Some("wh_other"),
            Some(&ts),
            Some(&signature),
            BODY,
            NOW
        ),
        Err(VerifyError::NoMatchingSignature)
    );
    // Still within the tolerance, but not the timestamp that was signed.
    assert_eq!(
        check(
            &secrets,
            Some(ID),
            Some(&(NOW + 1).to_string()),
            Some(&signature),
            BODY,
            NOW
        ),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn a_signature_under_another_secret_fails() {
    assert_eq!(
        check_signature(&secrets(&[KEY_B]), &sign(KEY_A, ID, NOW, BODY)),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn during_rotation_a_match_on_the_second_secret_passes() {
    let signature = sign(KEY_B, ID, NOW, BODY);
    for separator in [" ", ",", ", ", "\n"] {
        let configured = format!("{}{separator}{}", whsec(KEY_A), whsec(KEY_B));
        let secrets = WebhookSecrets::parse(&configured).expect("two secrets");
        assert_eq!(secrets.len(), 2);
        assert_eq!(check_signature(&secrets, &signature), ok_verified());
    }
    // And the first secret still works too.
    assert_eq!(
        check_signature(&secrets(&[KEY_A, KEY_B]), &sign(KEY_A, ID, NOW, BODY)),
        ok_verified()
    );
}

#[test]
fn the_good_signature_may_come_last_among_several() {
    let header = format!(
        "{} {} {}",
        decoy(1),
        sign(KEY_B, ID, NOW, BODY),
        sign(KEY_A, ID, NOW, BODY)
    );
    assert_eq!(check_signature(&secrets(&[KEY_A]), &header), ok_verified());
}

#[test]
fn malformed_entries_before_a_good_one_are_skipped() {
    let good = sign(KEY_A, ID, NOW, BODY);
    let truncated = &good[..good.len() - 4];
    let malformed = [
        "v1,",
        "v1,!!!!not-base64!!!!",
        "v1,AAAA",
        truncated,
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE", // 43 chars, unpadded
        "v1,g0hM9SsE-OTPJTGt_tmIKtSyZlE3uFJELVlNIOLJ1OE=", // URL-safe alphabet
        "v1",
        "garbage",
        ",",
    ];
    let header = format!("{} {good}", malformed.join(" "));
    assert_eq!(check_signature(&secrets(&[KEY_A]), &header), ok_verified());

    // Spaces doubled or at the ends do not matter either.
    assert_eq!(
        check_signature(&secrets(&[KEY_A]), &format!("  v1,AAAA   {good} ")),
        ok_verified()
    );
}

#[test]
fn malformed_entries_alone_do_not_pass() {
    let secrets = secrets(&[KEY_A]);
    for header in ["v1,", "v1, ", "v1,=", "v1,AAAA", "v1,!!!"] {
        assert_eq!(
            check_signature(&secrets, header),
            Err(VerifyError::NoMatchingSignature),
            "{header:?}"
        );
    }
    // Exactly the right length, but the wrong bytes.
    let zeros = format!("v1,{}", STANDARD.encode([0u8; 32]));
    assert_eq!(
        check_signature(&secrets, &zeros),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn entries_of_other_versions_are_ignored() {
    let secrets = secrets(&[KEY_A]);
    let good = sign(KEY_A, ID, NOW, BODY);
    let tag = good.strip_prefix("v1,").expect("v1 entry");

    // The right MAC under another version label is not a v1 signature.
    for other in ["v2", "v1a", "V1", "v0", ""] {
        assert_eq!(
            check_signature(&secrets, &format!("{other},{tag}")),
            Err(VerifyError::NoV1Signature),
            "{other:?}"
        );
    }
    assert_eq!(
        check_signature(&secrets, &format!("v2,{tag} v1a,{tag} {good}")),
        ok_verified()
    );
}

#[test]
fn only_the_first_entries_are_examined() {
    let secrets = secrets(&[KEY_A]);
    let good = sign(KEY_A, ID, NOW, BODY);
    let decoys = |count: u8| (0..count).map(decoy).collect::<Vec<_>>().join(" ");

    let cap = u8::try_from(MAX_SIGNATURE_ENTRIES).expect("small cap");
    let within = format!("{} {good}", decoys(cap - 1));
    assert_eq!(check_signature(&secrets, &within), ok_verified());

    let beyond = format!("{} {good}", decoys(cap));
    assert_eq!(
        check_signature(&secrets, &beyond),
        Err(VerifyError::NoMatchingSignature)
    );
    // Non-v1 entries count towards the cap too.
    let beyond = format!(
        "{} {good}",
        vec!["v2,AAAA"; MAX_SIGNATURE_ENTRIES].join(" ")
    );
    assert_eq!(
        check_signature(&secrets, &beyond),
        Err(VerifyError::NoV1Signature)
    );
}

#[test]
fn overlong_headers_are_refused() {
    let secrets = secrets(&[KEY_A]);
    let ts = NOW.to_string();
    let good = sign(KEY_A, ID, NOW, BODY);

    let padded = format!("{good}{}", " ".repeat(MAX_SIGNATURE_HEADER_LEN));
    assert_eq!(
        check(&secrets, Some(ID), Some(&ts), Some(&padded), BODY, NOW),
        Err(VerifyError::HeaderTooLong("webhook-signature"))
    );
    // Just at the limit is fine.
    let padded = format!(
        "{good}{}",
        " ".repeat(MAX_SIGNATURE_HEADER_LEN - good.len())
    );
    assert_eq!(
        check(&secrets, Some(ID), Some(&ts), Some(&padded), BODY, NOW),
        ok_verified()
    );

    let long_id = "w".repeat(100_000);
    let signature = sign(KEY_A, &long_id, NOW, BODY);
    assert_eq!(
        check(
            &secrets,
            Some(&long_id),
            Some(&ts),
            Some(&signature),
            BODY,
            NOW
        ),
        Err(VerifyError::HeaderTooLong("webhook-id"))
    );

    let long_ts = format!("{}{NOW}", "0".repeat(100));
    assert_eq!(
        check(&secrets, Some(ID), Some(&long_ts), Some(&good), BODY, NOW),
        Err(VerifyError::HeaderTooLong("webhook-timestamp"))
    );
}

#[test]
fn timestamps_301_seconds_away_fail_and_299_pass() {
    let secrets = secrets(&[KEY_A]);
    let at = |signed_at: i64| {
        check(
            &secrets,
            Some(ID),
            Some(&signed_at.to_string()),
            Some(&sign(KEY_A, ID, signed_at, BODY)),
            BODY,
            NOW,
        )
    };
    let passes = |signed_at: i64| {
        Ok(Verified {
            webhook_id: ID.to_owned(),
            timestamp: signed_at,
        })
    };

    assert_eq!(at(NOW - 301), Err(VerifyError::TooOld));
    assert_eq!(at(NOW - 299), passes(NOW - 299));
    assert_eq!(at(NOW - 300), passes(NOW - 300));
    assert_eq!(at(NOW + 301), Err(VerifyError::TooNew));
    assert_eq!(at(NOW + 299), passes(NOW + 299));
    assert_eq!(at(NOW + 300), passes(NOW + 300));
    assert_eq!(at(0), Err(VerifyError::TooOld));
    assert_eq!(at(i64::MAX), Err(VerifyError::TooNew));
}

#[test]
fn the_tolerance_is_the_callers() {
    let secrets = secrets(&[KEY_A]);
    let signed_at = NOW - 100;
    let ts = signed_at.to_string();
    let signature = sign(KEY_A, ID, signed_at, BODY);
    let verify_with = |tolerance: i64| {
        verify(
            &secrets,
            |name| match name {
                "webhook-id" => Some(ID),
                "webhook-timestamp" => Some(ts.as_str()),
                "webhook-signature" => Some(signature.as_str()),
                _ => None,
            },
            BODY,
            NOW,
            tolerance,
        )
    };
    assert_eq!(verify_with(99), Err(VerifyError::TooOld));
    assert_eq!(
        verify_with(100),
        Ok(Verified {
            webhook_id: ID.to_owned(),
            timestamp: signed_at,
        })
    );
    // A negative tolerance counts as zero, rather than refusing everything.
    let now_signature = sign(KEY_A, ID, NOW, BODY);
    let now_ts = NOW.to_string();
    assert_eq!(
        verify(
            &secrets,
            |name| match name {
                "webhook-id" => Some(ID),
                "webhook-timestamp" => Some(now_ts.as_str()),
                "webhook-signature" => Some(now_signature.as_str()),
                _ => None,
            },
            BODY,
            NOW,
            -5,
        ),
        ok_verified()
    );
}

#[test]
fn a_timestamp_that_is_not_integer_seconds_is_refused() {
    let secrets = secrets(&[KEY_A]);
    let good = sign(KEY_A, ID, NOW, BODY);
    for ts in [
        "1750000000.5",
        "1750000000.0",
        "1.75e9",
        "abc",
        "-1750000000",
        "+1750000000",
        "1750000000ms",
        "0x684ee180",
        "99999999999999999999",
        " ",
    ] {
        assert_eq!(
            check(&secrets, Some(ID), Some(ts), Some(&good), BODY, NOW),
            Err(VerifyError::BadTimestamp),
            "{ts:?}"
        );
    }
}

#[test]
fn each_missing_or_empty_header_is_named() {
    let secrets = secrets(&[KEY_A]);
    let ts = NOW.to_string();
    let good = sign(KEY_A, ID, NOW, BODY);
    for absent in [None, Some("")] {
        assert_eq!(
            check(&secrets, absent, Some(&ts), Some(&good), BODY, NOW),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            check(&secrets, Some(ID), absent, Some(&good), BODY, NOW),
            Err(VerifyError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            check(&secrets, Some(ID), Some(&ts), absent, BODY, NOW),
            Err(VerifyError::MissingHeader("webhook-signature"))
        );
    }
    assert_eq!(
        check(&secrets, None, None, None, BODY, NOW),
        Err(VerifyError::MissingHeader("webhook-id"))
    );
}

#[test]
fn the_whsec_prefix_is_optional() {
    let bare = STANDARD.encode(KEY_A);
    let unpadded = bare.trim_end_matches('=').to_owned();
    assert_ne!(bare, unpadded, "the test key should need padding");
    for configured in [whsec(KEY_A), bare, unpadded] {
        let secrets = WebhookSecrets::parse(&configured).expect("valid secret");
        assert_eq!(
            check_signature(&secrets, &sign(KEY_A, ID, NOW, BODY)),
            ok_verified(),
            "{configured}"
        );
    }
}

#[test]
fn bad_secret_configurations_are_refused() {
    assert_eq!(WebhookSecrets::parse("").err(), Some(SecretError::Empty));
    assert_eq!(
        WebhookSecrets::parse(" , \n").err(),
        Some(SecretError::Empty)
    );
    assert_eq!(
        WebhookSecrets::parse("whsec_not*base64!").err(),
        Some(SecretError::NotBase64 { position: 1 })
    );
    assert_eq!(
        WebhookSecrets::parse(&format!("{} whsec_%%%%", whsec(KEY_A))).err(),
        Some(SecretError::NotBase64 { position: 2 })
    );
    assert_eq!(
        WebhookSecrets::parse("whsec_").err(),
        Some(SecretError::TooShort { position: 1 })
    );
    assert_eq!(
        WebhookSecrets::parse("changeme").err(),
        Some(SecretError::TooShort { position: 1 })
    );
    let many = vec![whsec(KEY_A); 9].join(" ");
    assert_eq!(
        WebhookSecrets::parse(&many).err(),
        Some(SecretError::TooMany)
    );
    assert_eq!(
        WebhookSecrets::parse(&vec![whsec(KEY_A); 8].join(" "))
            .expect("eight secrets")
            .len(),
        8
    );
}

#[test]
fn debug_of_the_secrets_hides_the_keys() {
    let secrets = WebhookSecrets::parse(VECTOR_SECRET).expect("vector secret");
    let key = STANDARD
        .decode(VECTOR_SECRET.trim_start_matches("whsec_"))
        .expect("vector key is base64");
    for shown in [format!("{secrets:?}"), format!("{secrets:#?}")] {
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(!shown.contains("MfKQ9r8G"), "{shown}");
        // Neither as a list of numbers nor as hex.
        assert!(
            !shown.contains(&format!("{}, {}", key[0], key[1])),
            "{shown}"
        );
        assert!(!shown.contains(&hex::encode(&key[..4])), "{shown}");
    }
}

#[test]
fn error_messages_name_the_problem_and_contain_no_secret() {
    // A recognisable secret with one bad character in the middle: base64's own error
    // would name that character and its offset.
    let marker = "SECRETSECRETSECRET";
    let bad = format!("whsec_{marker}*{marker}");
    let error = WebhookSecrets::parse(&format!("{} {bad}", whsec(KEY_A))).expect_err("bad");
    let message = error.to_string();
    assert!(message.contains("#2"), "{message}");
    assert!(message.contains("base64"), "{message}");
    assert!(!message.contains("SECRET"), "{message}");
    assert!(!message.contains('*'), "{message}");
    assert!(!message.contains(&STANDARD.encode(KEY_A)), "{message}");

    let short = WebhookSecrets::parse("whsec_U0VDUkVU").expect_err("short");
    assert!(!short.to_string().contains("U0VDUkVU"), "{short}");
    assert!(short.to_string().contains("short"), "{short}");

    // Every way a verification fails, with the secret and the signatures at hand.
    let secrets = secrets(&[KEY_A]);
    let good = sign(KEY_A, ID, NOW, BODY);
    let wrong = sign(KEY_B, ID, NOW, BODY);
    let ts = NOW.to_string();
    let failures = [
        check(&secrets, Some(ID), Some(&ts), Some(&wrong), BODY, NOW),
        check(&secrets, Some(ID), Some(&ts), Some("v2,AAAA"), BODY, NOW),
        check(&secrets, Some(ID), Some("x"), Some(&good), BODY, NOW),
        check(&secrets, Some(ID), Some(&ts), Some(&good), BODY, NOW + 1000),
        check(&secrets, Some(ID), Some(&ts), Some(&good), BODY, NOW - 1000),
        check(&secrets, None, Some(&ts), Some(&good), BODY, NOW),
    ];
    let mut seen = Vec::new();
    for failure in failures {
        let message = failure.expect_err("each case fails").to_string();
        for secret_or_signature in [
            STANDARD.encode(KEY_A),
            STANDARD.encode(KEY_B),
            good.clone(),
            wrong.clone(),
            good["v1,".len()..][..8].to_owned(),
            wrong["v1,".len()..][..8].to_owned(),
        ] {
            assert!(!message.contains(&secret_or_signature), "{message}");
        }
        assert!(!message.is_empty() && message.len() < 80, "{message}");
        seen.push(message);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        6,
        "each failure says something different: {seen:?}"
    );
    assert!(
        VerifyError::MissingHeader("webhook-id")
            .to_string()
            .contains("webhook-id")
    );
}
