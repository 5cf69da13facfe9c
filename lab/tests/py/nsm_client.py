#!/usr/bin/env python3
"""A third-party NSM client: Python gRPC stubs generated with grpcio-tools
from the .proto files in api/proto, calling an nsmgr over its unix socket.

It exercises the wire contract with a gRPC stack that is not ours:
MonitorConnections (initial state transfer and updates), Request with a
KERNEL mechanism for the netns this script runs in, and Close.

Usage: nsm_client.py <proto-root> <nsmgr-socket> <service> <ifname>
Prints one JSON object with what it saw; exits non-zero on any failure.
"""
import json
import os
import subprocess
import sys
import tempfile
import threading

proto_root, sock, service, ifname = sys.argv[1:5]

from grpc_tools import protoc  # noqa: E402

out = tempfile.mkdtemp(prefix="nsm-py-")
dirs = [os.path.join(proto_root, d) for d in ("networkservice", "registry", "ipam")]
files = ["connectioncontext.proto", "connection.proto", "networkservice.proto", "registry.proto", "ipam.proto"]
import importlib.resources  # noqa: E402

wkt = str(importlib.resources.files("grpc_tools") / "_proto")
args = ["protoc", f"-I{wkt}"] + [f"-I{d}" for d in dirs] + [f"--python_out={out}", f"--grpc_python_out={out}"] + files
if protoc.main(args) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, out)

import grpc  # noqa: E402
import connection_pb2 as c  # noqa: E402
import connection_pb2_grpc as cg  # noqa: E402
import networkservice_pb2 as ns  # noqa: E402
import networkservice_pb2_grpc as nsg  # noqa: E402

# gRPC C-core (Python, C++, Ruby) sends the %-encoded socket path as
# :authority on unix sockets since 1.57 (grpc/grpc#38142); hyper's h2, under
# tonic, rejects that as a malformed authority (hyperium/h2#487, open). grpc-go
# -- and so every upstream NSM component -- sends "localhost", as we do here.
chan = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.default_authority", "localhost")])
grpc.channel_ready_future(chan).result(timeout=5)
mon = cg.MonitorConnectionStub(chan)
svc = nsg.NetworkServiceStub(chan)
seen = {}

events = mon.MonitorConnections(c.MonitorScopeSelector())
first = next(events)
assert first.type == c.INITIAL_STATE_TRANSFER, first
seen["initial_connections"] = len(first.connections)
updates = []


def watch():
    try:
        for ev in events:
            updates.append((ev.type, list(ev.connections.keys())))
    except grpc.RpcError:
        pass


t = threading.Thread(target=watch, daemon=True)
t.start()

inode = os.stat("/proc/self/ns/net").st_ino
req = ns.NetworkServiceRequest(
    connection=c.Connection(
        id="py-0",
        network_service=service,
        path=c.Path(index=0, path_segments=[c.PathSegment(name="py-client", id="py-0")]),
    ),
    mechanism_preferences=[
        c.Mechanism(cls="LOCAL", type="KERNEL", parameters={"name": ifname, "netnsInode": str(inode)})
    ],
)
conn = svc.Request(req, timeout=15)
seen["id"] = conn.id
seen["path"] = [s.name for s in conn.path.path_segments]
seen["src_ip_addrs"] = list(conn.context.ip_context.src_ip_addrs)
seen["dst_ip_addrs"] = list(conn.context.ip_context.dst_ip_addrs)
seen["mechanism"] = [conn.mechanism.type, conn.mechanism.parameters.get("name")]
seen["state"] = c.State.Name(conn.state)
seen["link_after_request"] = subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode == 0
ping = subprocess.run(["ping", "-c", "1", "-W", "2", "-I", ifname, conn.context.ip_context.dst_ip_addrs[0].split("/")[0]], capture_output=True)
seen["ping"] = ping.returncode == 0

svc.Close(conn, timeout=15)
seen["link_after_close"] = subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode == 0

# Bad input gets a gRPC status with a message.
bad = ns.NetworkServiceRequest(connection=c.Connection(id="py-1", network_service="no-such-service"),
                               mechanism_preferences=req.mechanism_preferences)
try:
    svc.Request(bad, timeout=15)
    seen["unknown_service"] = "accepted?!"
except grpc.RpcError as e:
    seen["unknown_service"] = [e.code().name, e.details()]

import time  # noqa: E402

time.sleep(0.3)
seen["update_types"] = sorted({c.ConnectionEventType.Name(u[0]) for u in updates})
chan.close()
print(json.dumps(seen))
