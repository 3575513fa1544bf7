//! `huddle server trust`: re-pinning the server's certificate after it
//! changed.

use huddle_client::{Client, ClientError};

use crate::Out;

/// `huddle server trust`.
pub(crate) async fn server_trust(
    client: &mut Client,
    out: &Out,
    yes: bool,
) -> Result<(), ClientError> {
    use huddle_core::auth::cert_fingerprint;
    let p = client.presented_certificate().await?;
    let pinned = p.pinned.as_deref().map(cert_fingerprint);
    let presented = cert_fingerprint(&p.presented);
    let report = |trusted: bool| {
        if out.json {
            out.json(&serde_json::json!({
                "pinned": pinned, "presented": presented, "trusted": trusted,
            }));
        }
    };
    if p.matches() {
        report(true);
        if !out.json {
            out.line(&format!(
                "the server presents the pinned certificate {presented}; nothing to change"
            ));
        }
        return Ok(());
    }
    if !out.json {
        out.line(&format!(
            "pinned:    {}",
            pinned.as_deref().unwrap_or("(none)")
        ));
        out.line(&format!("presented: {presented}"));
    }
    let agreed = yes
        || {
            eprint!("Compare the presented fingerprint with the one the server printed. Trust it from now on? [y/N] ");
            let mut answer = String::new();
            std::io::stdin()
                .read_line(&mut answer)
                .map_err(|e| ClientError::Io(format!("reading the answer: {e}")))?;
            matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
        };
    if !agreed {
        report(false);
        return Err(ClientError::Usage(
            "the pinned certificate is unchanged".into(),
        ));
    }
    client.pin_certificate(&p.presented)?;
    report(true);
    if !out.json {
        out.line(&format!("pinned {presented}"));
    }
    Ok(())
}
