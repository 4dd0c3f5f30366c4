//! Reading the identity out of a peer's certificate.
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::Identity;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanError {
    #[error("certificate is not valid DER X.509: {0}")]
    Parse(String),
    #[error("certificate has no URI subject alternative name")]
    NoUri,
    #[error("certificate has {0} URI subject alternative names; workload certificates have one")]
    ManyUris(usize),
    #[error(transparent)]
    NotSpiffe(#[from] super::ParseIdentityError),
}

/// The URI subject alternative names of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Result<Vec<String>, SanError> {
    Ok(names(der)?
        .into_iter()
        .filter_map(|(uri, name)| uri.then_some(name))
        .collect())
}

/// The URI and DNS subject alternative names of a DER certificate, each with whether it is a
/// URI.
pub fn names(der: &[u8]) -> Result<Vec<(bool, String)>, SanError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|error| SanError::Parse(error.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|error| SanError::Parse(error.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((true, (*uri).to_owned())),
                    GeneralName::DNSName(dns) => Some((false, (*dns).to_owned())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The workload identity of a leaf certificate: its one URI SAN, parsed as a SPIFFE ID.
pub fn identity_of(der: &[u8]) -> Result<Identity, SanError> {
    let uris = uri_sans(der)?;
    match uris.as_slice() {
        [] => Err(SanError::NoUri),
        [uri] => Ok(uri.parse()?),
        many => Err(SanError::ManyUris(many.len())),
    }
}
