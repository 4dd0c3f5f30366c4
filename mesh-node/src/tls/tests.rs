//! In-memory handshakes between the HBONE client and server configurations.
use std::{sync::Arc, time::Duration};

use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};

use super::*;
use crate::identity::{Identity, file_ca::FileCa, san};

const TTL: Duration = Duration::from_secs(3600);

fn certified(ca: &FileCa, tls: &Tls, id: &Identity) -> Certified {
    tls.certified(&ca.issue(id, TTL).unwrap()).unwrap()
}

/// Runs a handshake to completion or to the first error; returns the server's view of the
/// client identity.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> Result<Identity, rustls::Error> {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
    let mut c = ClientConnection::new(client, name)?;
    let mut s = ServerConnection::new(server)?;
    for _ in 0..10 {
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets()?;
        let mut wire = Vec::new();
        s.write_tls(&mut wire).unwrap();
        c.read_tls(&mut &wire[..]).unwrap();
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            let der = &s.peer_certificates().expect("client certificate")[0];
            assert_eq!(s.alpn_protocol(), Some(ALPN_H2));
            return Ok(san::identity_of(der).unwrap());
        }
    }
    panic!("handshake did not finish");
}

fn ids() -> (Identity, Identity) {
    (
        Identity::new("cluster.local", "default", "client"),
        Identity::new("cluster.local", "default", "server"),
    )
}

#[test]
fn mutual_tls_with_expected_identity() {
    let tls = Tls::new("cluster.local");
    let ca = FileCa::generate("cluster.local", TTL).unwrap();
    let (client_id, server_id) = ids();
    let client = certified(&ca, &tls, &client_id);
    let server = certified(&ca, &tls, &server_id);
    let config = tls.client_config(&client, vec![server_id.into()]).unwrap();
    assert_eq!(
        handshake(config, server.server_config.clone()).unwrap(),
        client_id
    );
}

#[test]
fn client_refuses_unexpected_server_identity() {
    let tls = Tls::new("cluster.local");
    let ca = FileCa::generate("cluster.local", TTL).unwrap();
    let (client_id, server_id) = ids();
    let client = certified(&ca, &tls, &client_id);
    let server = certified(&ca, &tls, &server_id);
    let other = Identity::new("cluster.local", "default", "other");
    let config = tls.client_config(&client, vec![other.into()]).unwrap();
    let error = handshake(config, server.server_config.clone()).unwrap_err();
    assert!(
        describe(&error).contains("spiffe://cluster.local/ns/default/sa/server is not one of"),
        "{error}"
    );
}

#[test]
fn server_refuses_foreign_trust_domain_and_foreign_root() {
    let tls = Tls::new("cluster.local");
    let ca = FileCa::generate("cluster.local", TTL).unwrap();
    let (_, server_id) = ids();
    let server = certified(&ca, &tls, &server_id);

    let foreign = Identity::new("evil.example", "default", "client");
    let client = certified(&ca, &Tls::new("evil.example"), &foreign);
    let config = tls
        .client_config(&client, vec![server_id.clone().into()])
        .unwrap();
    let error = handshake(config, server.server_config.clone()).unwrap_err();
    assert!(
        describe(&error).contains("outside trust domain cluster.local"),
        "{error}"
    );

    let other_ca = FileCa::generate("cluster.local", TTL).unwrap();
    let stranger = certified(&other_ca, &tls, &ids().0);
    let mut config = (*tls
        .client_config(&stranger, vec![server_id.into()])
        .unwrap())
    .clone();
    // The stranger trusts our root, so only the server's check of the client chain can fail.
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            server.roots.clone(),
            tls.provider().clone(),
            vec![ids().1.into()],
        )));
    assert!(handshake(Arc::new(config), server.server_config.clone()).is_err());
}

#[test]
fn server_requires_a_client_certificate() {
    let tls = Tls::new("cluster.local");
    let ca = FileCa::generate("cluster.local", TTL).unwrap();
    let (_, server_id) = ids();
    let server = certified(&ca, &tls, &server_id);
    let mut config = ClientConfig::builder_with_provider(tls.provider().clone())
        .with_protocol_versions(&[&TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            server.roots.clone(),
            tls.provider().clone(),
            vec![server_id.into()],
        )))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let error = handshake(Arc::new(config), server.server_config.clone()).unwrap_err();
    assert!(
        matches!(error, rustls::Error::NoCertificatesPresented),
        "{error}"
    );
}

#[test]
fn a_certificate_peers_would_refuse_is_refused_when_it_arrives() {
    let tls = Tls::new("cluster.local");
    let id = Identity::new("cluster.local", "ns", "sa");
    let ca = FileCa::generate("cluster.local", TTL).unwrap();
    let other = FileCa::generate("cluster.local", TTL).unwrap();
    // Signed by one root, presented with another as the mesh root.
    let mut cert = other.issue(&id, TTL).unwrap();
    cert.roots = vec![ca.root().clone()];
    let error = tls.certified(&cert).unwrap_err().to_string();
    assert!(
        error.starts_with("certificate for spiffe://cluster.local/ns/ns/sa/sa:")
            && error.contains("invalid peer certificate"),
        "{error}"
    );
    // Its identity outside our trust domain.
    let foreign = Identity::new("evil.example", "ns", "sa");
    let error = tls
        .certified(&ca.issue(&foreign, TTL).unwrap())
        .unwrap_err()
        .to_string();
    assert!(error.contains("outside trust domain"), "{error}");
}

/// A root and a leaf for `api.example.com` (a DNS SAN, no SPIFFE ID), as a ServiceEntry's
/// endpoint might present.
fn dns_named_leaf() -> (
    Arc<rustls::RootCertStore>,
    rustls::pki_types::CertificateDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["api.example.com".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.der().clone()).unwrap();
    (Arc::new(roots), leaf.der().clone())
}

#[test]
fn a_non_spiffe_subject_alt_name_is_matched_against_the_certificates_names() {
    use rustls::client::danger::ServerCertVerifier;
    let (roots, leaf) = dns_named_leaf();
    let tls = Tls::new("cluster.local");
    let verify = |expected: Vec<San>| {
        SpiffeServerVerifier::new(roots.clone(), tls.provider().clone(), expected)
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from("mesh.invalid").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
    };
    assert!(verify(vec![San::Other("api.example.com".into())]).is_ok());
    let error = verify(vec![San::Other("other.example.com".into()), ids().1.into()]).unwrap_err();
    assert!(
        describe(&error).contains("api.example.com is not one of the expected identities"),
        "{error}"
    );
}
