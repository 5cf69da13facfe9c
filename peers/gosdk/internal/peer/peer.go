// Package peer holds what both Go-sdk peers share: configuration from the
// environment (the upstream variable names), the SPIFFE X.509 source, and the
// gRPC dial options every upstream NSM command uses (mTLS with the SVID,
// grpcfd fd passing under TLS, per-RPC JWT tokens signed with the SVID).
//
// These programs are this project's own test peers: small mains written here
// around the upstream Go sdk (github.com/networkservicemesh/sdk), so that the
// tests run real upstream chains (client, endpoint, registry clients, OPA
// policies, token handling, grpcfd) against our Rust daemons.
package peer

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/edwarnicke/grpcfd"
	"github.com/networkservicemesh/sdk/pkg/tools/spiffejwt"
	"github.com/networkservicemesh/sdk/pkg/tools/token"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// Contexts returns the program's context, which outlives the signal so the
// chains built on it can still Close and Unregister, and one that is done on
// SIGTERM or SIGINT; cancel ends both.
func Contexts() (ctx, stop context.Context, cancel func()) {
	ctx, cancelCtx := context.WithCancel(context.Background())
	stop, stopped := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	return ctx, stop, func() { stopped(); cancelCtx() }
}

// Env returns the variable's value, or def when it is unset or empty.
func Env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// Fatalf prints one line naming what was wrong and exits 1.
func Fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "error: "+format+"\n", args...)
	os.Exit(1)
}

// Duration reads a Go duration from the environment.
func Duration(name, def string) time.Duration {
	v := Env(name, def)
	d, err := time.ParseDuration(v)
	if err != nil {
		Fatalf("%s=%q is not a duration: %v", name, v, err)
	}
	return d
}

// URL reads an NSM URL (unix:///path or tcp://host:port) from the environment.
func URL(name, def string) *url.URL {
	v := Env(name, def)
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "unix" && u.Scheme != "tcp") {
		Fatalf("%s=%q is not a unix:// or tcp:// URL", name, v)
	}
	return u
}

// Labels parses k=v,k=v.
func Labels(name string) map[string]string {
	out := map[string]string{}
	for _, kv := range strings.Split(os.Getenv(name), ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			Fatalf("%s: %q is not key=value", name, kv)
		}
		out[k] = v
	}
	return out
}

// Source connects to the Workload API named by SPIFFE_ENDPOINT_SOCKET and
// waits for the first SVID.
func Source(ctx context.Context) *workloadapi.X509Source {
	if os.Getenv("SPIFFE_ENDPOINT_SOCKET") == "" {
		Fatalf("SPIFFE_ENDPOINT_SOCKET is not set (the SPIFFE Workload API socket, unix:///...)")
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	source, err := workloadapi.NewX509Source(wctx)
	if err != nil {
		Fatalf("no SVID from the Workload API at %s: %v", os.Getenv("SPIFFE_ENDPOINT_SOCKET"), err)
	}
	return source
}

// Tokens is the upstream token generator: a JWT signed with the SVID's key.
func Tokens(source x509svid.Source) token.GeneratorFunc {
	return spiffejwt.TokenGeneratorFunc(source, Duration("NSM_MAX_TOKEN_LIFETIME", "10m"))
}

// DialOptions are the dial options of the upstream commands.
func DialOptions(source *workloadapi.X509Source) []grpc.DialOption {
	tlsConfig := tlsconfig.MTLSClientConfig(source, source, tlsconfig.AuthorizeAny())
	tlsConfig.MinVersion = tls.VersionTLS12
	return []grpc.DialOption{
		grpc.WithTransportCredentials(grpcfd.TransportCredentials(credentials.NewTLS(tlsConfig))),
		grpc.WithDefaultCallOptions(
			grpc.WaitForReady(true),
			grpc.PerRPCCredentials(token.NewPerRPCCredentials(Tokens(source))),
		),
		grpcfd.WithChainStreamInterceptor(),
		grpcfd.WithChainUnaryInterceptor(),
	}
}

// ServerOptions are the server options of the upstream endpoints: mTLS and
// grpcfd.
func ServerOptions(source *workloadapi.X509Source) []grpc.ServerOption {
	tlsConfig := tlsconfig.MTLSServerConfig(source, source, tlsconfig.AuthorizeAny())
	tlsConfig.MinVersion = tls.VersionTLS12
	return []grpc.ServerOption{grpc.Creds(grpcfd.TransportCredentials(credentials.NewTLS(tlsConfig)))}
}
