// nsm-go-nse: an ICMP-responder endpoint built on the upstream Go sdk's
// endpoint chain, as cmd-nse-icmp-responder assembles it (updatepath, begin,
// updatetoken, the OPA authorize server with the upstream policies, metadata,
// timeout, monitor, trimpath, then point2pointipam, mechanisms{KERNEL, NOOP},
// sendfd), serving on a unix socket in its own temporary directory and
// registering through the nsmgr with the upstream registry clients (the
// socket is fd-passed: the URL registered is inode://dev/ino). A test peer of
// this project; see ../internal/peer.
//
// Environment (upstream names): NSM_NAME (icmp-server), NSM_CONNECT_TO
// (unix:///var/lib/networkservicemesh/nsm.io.sock), NSM_SERVICE_NAMES
// (icmp-responder), NSM_PAYLOAD (ETHERNET), NSM_LABELS (k=v,...),
// NSM_CIDR_PREFIX (169.254.0.0/16), NSM_REGISTER_SERVICE (true),
// NSM_MAX_TOKEN_LIFETIME (10m), SPIFFE_ENDPOINT_SOCKET.
//
// Prints "listening <url>" and then "registered <json of the registration>";
// on SIGTERM or SIGINT it unregisters, prints "unregistered <name>" and exits.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/networkservicemesh/api/pkg/api/networkservice"
	kernelmech "github.com/networkservicemesh/api/pkg/api/networkservice/mechanisms/kernel"
	"github.com/networkservicemesh/api/pkg/api/networkservice/mechanisms/noop"
	registryapi "github.com/networkservicemesh/api/pkg/api/registry"
	"github.com/networkservicemesh/sdk/pkg/networkservice/chains/endpoint"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/authorize"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/mechanisms"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/mechanisms/kernel"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/mechanisms/sendfd"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/null"
	"github.com/networkservicemesh/sdk/pkg/networkservice/ipam/point2pointipam"
	registryclient "github.com/networkservicemesh/sdk/pkg/registry/chains/client"
	registryauthorize "github.com/networkservicemesh/sdk/pkg/registry/common/authorize"
	registryclientinfo "github.com/networkservicemesh/sdk/pkg/registry/common/clientinfo"
	registrysendfd "github.com/networkservicemesh/sdk/pkg/registry/common/sendfd"
	"github.com/networkservicemesh/sdk/pkg/tools/grpcutils"
	"google.golang.org/grpc"

	"nsm-rs.invalid/gosdk-peers/internal/peer"
)

func main() {
	ctx, stop, cancel := peer.Contexts()
	defer cancel()

	name := peer.Env("NSM_NAME", "icmp-server")
	connectTo := peer.URL("NSM_CONNECT_TO", "unix:///var/lib/networkservicemesh/nsm.io.sock")
	services := strings.Split(peer.Env("NSM_SERVICE_NAMES", "icmp-responder"), ",")
	payload := peer.Env("NSM_PAYLOAD", "ETHERNET")
	labels := peer.Labels("NSM_LABELS")
	cidr := peer.Env("NSM_CIDR_PREFIX", "169.254.0.0/16")
	_, prefix, err := net.ParseCIDR(cidr)
	if err != nil {
		peer.Fatalf("NSM_CIDR_PREFIX=%q is not a CIDR: %v", cidr, err)
	}

	source := peer.Source(ctx)
	defer func() { _ = source.Close() }()

	responder := endpoint.NewServer(ctx, peer.Tokens(source),
		endpoint.WithName(name),
		endpoint.WithAuthorizeServer(authorize.NewServer()),
		endpoint.WithAdditionalFunctionality(
			point2pointipam.NewServer(prefix),
			mechanisms.NewServer(map[string]networkservice.NetworkServiceServer{
				kernelmech.MECHANISM: kernel.NewServer(),
				noop.MECHANISM:       null.NewServer(),
			}),
			sendfd.NewServer(),
		),
	)
	server := grpc.NewServer(peer.ServerOptions(source)...)
	responder.Register(server)
	dir, err := os.MkdirTemp("", name)
	if err != nil {
		peer.Fatalf("temporary directory for the socket: %v", err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	listenOn := &url.URL{Scheme: "unix", Path: filepath.Join(dir, "listen.on")}
	serveErr := grpcutils.ListenAndServe(ctx, listenOn, server)
	fmt.Printf("listening %s\n", listenOn)

	dial := peer.DialOptions(source)
	if peer.Env("NSM_REGISTER_SERVICE", "true") == "true" {
		nsClient := registryclient.NewNetworkServiceRegistryClient(ctx,
			registryclient.WithClientURL(connectTo),
			registryclient.WithDialOptions(dial...),
			registryclient.WithAuthorizeNSRegistryClient(registryauthorize.NewNetworkServiceRegistryClient()),
		)
		for _, s := range services {
			rctx, rcancel := context.WithTimeout(stop, 15*time.Second)
			_, err := nsClient.Register(rctx, &registryapi.NetworkService{Name: s, Payload: payload})
			rcancel()
			if err != nil {
				peer.Fatalf("register network service %s at %s: %v", s, connectTo, err)
			}
		}
	}
	nseClient := registryclient.NewNetworkServiceEndpointRegistryClient(ctx,
		registryclient.WithClientURL(connectTo),
		registryclient.WithDialOptions(dial...),
		registryclient.WithNSEAdditionalFunctionality(
			registryclientinfo.NewNetworkServiceEndpointRegistryClient(),
			registrysendfd.NewNetworkServiceEndpointRegistryClient(),
		),
		registryclient.WithAuthorizeNSERegistryClient(registryauthorize.NewNetworkServiceEndpointRegistryClient()),
	)
	nse := &registryapi.NetworkServiceEndpoint{
		Name:                 name,
		NetworkServiceNames:  services,
		NetworkServiceLabels: map[string]*registryapi.NetworkServiceLabels{},
		Url:                  listenOn.String(),
	}
	for _, s := range services {
		nse.NetworkServiceLabels[s] = &registryapi.NetworkServiceLabels{Labels: labels}
	}
	rctx, rcancel := context.WithTimeout(stop, 15*time.Second)
	registered, err := nseClient.Register(rctx, nse)
	rcancel()
	if err != nil {
		peer.Fatalf("register endpoint %s at %s: %v", name, connectTo, err)
	}
	js, _ := json.Marshal(registered)
	fmt.Printf("registered %s\n", js)

	select {
	case <-stop.Done():
	case err := <-serveErr:
		peer.Fatalf("serving %s: %v", listenOn, err)
	}
	uctx, ucancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer ucancel()
	if _, err := nseClient.Unregister(uctx, registered); err != nil {
		fmt.Fprintf(os.Stderr, "error: unregister %s: %v\n", name, err)
		return
	}
	fmt.Printf("unregistered %s\n", name)
}
