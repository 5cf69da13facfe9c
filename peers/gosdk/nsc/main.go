// nsm-go-nsc: an NSM client built on the upstream Go sdk's client chain, as
// cmd-nsc assembles it (updatepath, begin, metadata, refresh, clienturl,
// clientconn, dial, clientinfo, the KERNEL mechanism client, sendfd, the OPA
// authorize client with the upstream policies, trimpath, connect). A test peer
// of this project; see ../internal/peer.
//
// Environment (upstream names): NSM_NETWORK_SERVICES (required, comma-separated
// NSURLs such as kernel://icmp-responder/nsm-1), NSM_NAME (nsc), NSM_CONNECT_TO
// (unix:///var/lib/networkservicemesh/nsm.io.sock), NSM_DIAL_TIMEOUT (5s),
// NSM_REQUEST_TIMEOUT (15s), NSM_MAX_TOKEN_LIFETIME (10m), SPIFFE_ENDPOINT_SOCKET.
//
// For each NSURL it Requests a connection with id <NSM_NAME>-<i>, prints one
// line "connected <id> <json of the connection>", keeps refreshing, and on
// SIGTERM or SIGINT Closes every connection and prints "closed <id>". A failed
// Request exits 1 with the error.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/networkservicemesh/api/pkg/api/networkservice"
	"github.com/networkservicemesh/sdk/pkg/networkservice/chains/client"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/authorize"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/clientinfo"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/mechanisms/kernel"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/mechanisms/sendfd"
	"github.com/networkservicemesh/sdk/pkg/tools/nsurl"

	"nsm-rs.invalid/gosdk-peers/internal/peer"
)

func main() {
	ctx, stop, cancel := peer.Contexts()
	defer cancel()

	services := peer.Env("NSM_NETWORK_SERVICES", "")
	if services == "" {
		peer.Fatalf("NSM_NETWORK_SERVICES is required (comma-separated NSURLs, e.g. kernel://icmp-responder/nsm-1)")
	}
	name := peer.Env("NSM_NAME", "nsc")
	connectTo := peer.URL("NSM_CONNECT_TO", "unix:///var/lib/networkservicemesh/nsm.io.sock")
	requestTimeout := peer.Duration("NSM_REQUEST_TIMEOUT", "15s")

	source := peer.Source(ctx)
	defer func() { _ = source.Close() }()

	nsc := client.NewClient(ctx,
		client.WithClientURL(connectTo),
		client.WithName(name),
		client.WithAuthorizeClient(authorize.NewClient()),
		client.WithAdditionalFunctionality(
			clientinfo.NewClient(),
			kernel.NewClient(),
			sendfd.NewClient(),
		),
		client.WithDialTimeout(peer.Duration("NSM_DIAL_TIMEOUT", "5s")),
		client.WithDialOptions(peer.DialOptions(source)...),
	)

	var conns []*networkservice.Connection
	for i, raw := range strings.Split(services, ",") {
		u, err := url.Parse(strings.TrimSpace(raw))
		if err != nil || u.Host == "" {
			peer.Fatalf("NSM_NETWORK_SERVICES: %q is not an NSURL (mechanism://service[/interface])", raw)
		}
		nu := (*nsurl.NSURL)(u)
		id := fmt.Sprintf("%s-%d", name, i)
		request := &networkservice.NetworkServiceRequest{
			Connection: &networkservice.Connection{
				Id:             id,
				NetworkService: nu.NetworkService(),
				Labels:         nu.Labels(),
			},
			MechanismPreferences: []*networkservice.Mechanism{nu.Mechanism()},
		}
		rctx, rcancel := context.WithTimeout(stop, requestTimeout)
		conn, err := nsc.Request(rctx, request)
		rcancel()
		if err != nil {
			closeAll(nsc, conns)
			peer.Fatalf("request %s for %s: %v", id, raw, err)
		}
		conns = append(conns, conn)
		js, _ := json.Marshal(conn)
		fmt.Printf("connected %s %s\n", id, js)
	}

	<-stop.Done()
	closeAll(nsc, conns)
}

func closeAll(nsc networkservice.NetworkServiceClient, conns []*networkservice.Connection) {
	for _, conn := range conns {
		cctx, cancel := context.WithTimeout(context.Background(), peer.Duration("NSM_REQUEST_TIMEOUT", "15s"))
		_, err := nsc.Close(cctx, conn)
		cancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "error: close %s: %v\n", conn.GetId(), err)
			continue
		}
		fmt.Printf("closed %s\n", conn.GetId())
	}
}
