//! Pins the wire contract: proto packages, file names, service method paths
//! and every field name/number, as published for networkservicemesh/api v1
//! (nsm-spec.md section 1). A change to any `.proto` that would break Go NSM
//! interop fails here.
#![allow(clippy::unwrap_used)]

use prost::Message;
use prost_types::FileDescriptorSet;

fn fds() -> FileDescriptorSet {
    FileDescriptorSet::decode(nsm_api::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn fields(fds: &FileDescriptorSet, pkg: &str, msg: &str) -> Vec<(String, i32)> {
    for f in &fds.file {
        if f.package() != pkg {
            continue;
        }
        let found = f.message_type.iter().find(|m| m.name() == msg);
        if let Some(m) = found {
            return m.field.iter().map(|x| (x.name().to_string(), x.number())).collect();
        }
    }
    panic!("message {pkg}.{msg} not found");
}

fn check(pkg: &str, msg: &str, want: &[(&str, i32)]) {
    let got = fields(&fds(), pkg, msg);
    let want: Vec<(String, i32)> = want.iter().map(|(n, i)| (n.to_string(), *i)).collect();
    assert_eq!(got, want, "{pkg}.{msg}");
}

#[test]
fn files_and_packages_use_bare_names() {
    let got: Vec<(String, String)> =
        fds().file.iter().map(|f| (f.name().to_string(), f.package().to_string())).collect();
    for (name, pkg) in [
        ("connectioncontext.proto", "connectioncontext"),
        ("connection.proto", "connection"),
        ("networkservice.proto", "networkservice"),
        ("registry.proto", "registry"),
        ("ipam.proto", "ipam"),
    ] {
        assert!(got.contains(&(name.to_string(), pkg.to_string())), "{name} ({pkg}) missing in {got:?}");
    }
    let conn = fds().file.into_iter().find(|f| f.name() == "connection.proto").unwrap();
    assert!(conn.dependency.contains(&"connectioncontext.proto".to_string()), "bare import");
}

#[test]
fn services_and_methods() {
    let mut got = vec![];
    for f in fds().file {
        for s in &f.service {
            for m in &s.method {
                got.push(format!(
                    "/{}.{}/{} {} -> {}{}{}",
                    f.package(),
                    s.name(),
                    m.name(),
                    m.input_type(),
                    m.output_type(),
                    if m.client_streaming() { " cs" } else { "" },
                    if m.server_streaming() { " ss" } else { "" },
                ));
            }
        }
    }
    got.sort();
    let mut want = vec![
        "/networkservice.NetworkService/Request .networkservice.NetworkServiceRequest -> .connection.Connection",
        "/networkservice.NetworkService/Close .connection.Connection -> .google.protobuf.Empty",
        "/connection.MonitorConnection/MonitorConnections .connection.MonitorScopeSelector -> .connection.ConnectionEvent ss",
        "/registry.NetworkServiceRegistry/Register .registry.NetworkService -> .registry.NetworkService",
        "/registry.NetworkServiceRegistry/Find .registry.NetworkServiceQuery -> .registry.NetworkServiceResponse ss",
        "/registry.NetworkServiceRegistry/Unregister .registry.NetworkService -> .google.protobuf.Empty",
        "/registry.NetworkServiceEndpointRegistry/Register .registry.NetworkServiceEndpoint -> .registry.NetworkServiceEndpoint",
        "/registry.NetworkServiceEndpointRegistry/Find .registry.NetworkServiceEndpointQuery -> .registry.NetworkServiceEndpointResponse ss",
        "/registry.NetworkServiceEndpointRegistry/Unregister .registry.NetworkServiceEndpoint -> .google.protobuf.Empty",
        "/ipam.IPAM/ManagePrefixes .ipam.PrefixRequest -> .ipam.PrefixResponse cs ss",
    ];
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn connection_messages() {
    check("connection", "Mechanism", &[("cls", 1), ("type", 2), ("parameters", 3)]);
    check("connection", "PathSegment", &[("name", 1), ("id", 2), ("token", 3), ("expires", 4), ("metrics", 5)]);
    check("connection", "Path", &[("index", 1), ("path_segments", 2)]);
    check(
        "connection",
        "Connection",
        &[
            ("id", 1),
            ("network_service", 2),
            ("mechanism", 3),
            ("context", 4),
            ("labels", 5),
            ("path", 6),
            ("network_service_endpoint_name", 7),
            ("payload", 8),
            ("state", 9),
        ],
    );
    check("connection", "ConnectionEvent", &[("type", 1), ("connections", 2)]);
    check("connection", "MonitorScopeSelector", &[("path_segments", 1), ("network_services", 2)]);
    check("networkservice", "NetworkServiceRequest", &[("connection", 1), ("mechanism_preferences", 2)]);
}

#[test]
fn connectioncontext_messages() {
    check("connectioncontext", "IpNeighbor", &[("ip", 1), ("hardware_address", 2)]);
    check("connectioncontext", "Route", &[("prefix", 1), ("nextHop", 2)]);
    check("connectioncontext", "IpFamily", &[("family", 1)]);
    check(
        "connectioncontext",
        "ExtraPrefixRequest",
        &[("addr_family", 1), ("prefix_len", 2), ("required_number", 3), ("requested_number", 4)],
    );
    check(
        "connectioncontext",
        "PolicyRoute",
        &[("from", 1), ("proto", 2), ("dst_port", 3), ("src_port", 4), ("routes", 5)],
    );
    check(
        "connectioncontext",
        "IPContext",
        &[
            ("src_ip_addrs", 1),
            ("dst_ip_addrs", 2),
            ("src_ip_required", 3),
            ("dst_ip_required", 4),
            ("src_routes", 5),
            ("dst_routes", 6),
            ("excluded_prefixes", 7),
            ("ip_neighbors", 8),
            ("extra_prefix_request", 9),
            ("extra_prefixes", 10),
            ("policies", 11),
        ],
    );
    check("connectioncontext", "DNSConfig", &[("dns_server_ips", 1), ("search_domains", 2)]);
    check("connectioncontext", "DNSContext", &[("configs", 1)]);
    check("connectioncontext", "EthernetContext", &[("src_mac", 1), ("dst_mac", 2), ("vlan_tag", 3)]);
    check(
        "connectioncontext",
        "ConnectionContext",
        &[("ip_context", 1), ("dns_context", 2), ("ethernet_context", 3), ("extra_context", 4), ("MTU", 5)],
    );
}

#[test]
fn registry_and_ipam_messages() {
    check("registry", "NetworkService", &[("name", 1), ("payload", 2), ("matches", 3), ("path_ids", 4)]);
    check("registry", "Match", &[("source_selector", 1), ("routes", 2), ("fallthrough", 3), ("metadata", 4)]);
    check("registry", "Metadata", &[("labels", 1)]);
    check("registry", "Destination", &[("destination_selector", 1), ("weight", 2)]);
    check("registry", "NetworkServiceLabels", &[("labels", 1)]);
    check(
        "registry",
        "NetworkServiceEndpoint",
        &[
            ("name", 1),
            ("network_service_names", 2),
            ("network_service_labels", 3),
            ("url", 4),
            ("expiration_time", 5),
            ("initial_registration_time", 6),
            ("path_ids", 7),
        ],
    );
    check("registry", "NetworkServiceQuery", &[("network_service", 1), ("watch", 2)]);
    check("registry", "NetworkServiceEndpointQuery", &[("network_service_endpoint", 1), ("watch", 2)]);
    check("registry", "NetworkServiceResponse", &[("network_service", 1), ("deleted", 2)]);
    check("registry", "NetworkServiceEndpointResponse", &[("network_service_endpoint", 1), ("deleted", 2)]);
    check("ipam", "PrefixRequest", &[("type", 1), ("prefix", 2), ("exclude_prefixes", 3)]);
    check("ipam", "PrefixResponse", &[("prefix", 2), ("exclude_prefixes", 3)]);
}

#[test]
fn enums() {
    let f = fds();
    let e = |pkg: &str, name: &str| -> Vec<(String, i32)> {
        f.file
            .iter()
            .filter(|x| x.package() == pkg)
            .flat_map(|x| x.enum_type.iter())
            .find(|x| x.name() == name)
            .map(|x| x.value.iter().map(|v| (v.name().to_string(), v.number())).collect())
            .unwrap_or_else(|| panic!("{pkg}.{name}"))
    };
    let s = |v: &[(&str, i32)]| v.iter().map(|(a, b)| (a.to_string(), *b)).collect::<Vec<_>>();
    assert_eq!(
        e("connection", "State"),
        s(&[("UP", 0), ("DOWN", 1), ("REFRESH_REQUESTED", 2), ("RESELECT_REQUESTED", 3)])
    );
    assert_eq!(
        e("connection", "ConnectionEventType"),
        s(&[("INITIAL_STATE_TRANSFER", 0), ("UPDATE", 1), ("DELETE", 2)])
    );
    assert_eq!(e("ipam", "Type"), s(&[("UNDEFINED", 0), ("ALLOCATE", 1), ("DELETE", 2)]));
}
