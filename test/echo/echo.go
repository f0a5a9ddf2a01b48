// Package echo is the upstream that egressd's integration tests and demo talk
// to: an HTTP handler that answers every request with the address the request
// came from and records that address, plus a throw-away self-signed
// certificate so the same handler can sit behind TLS.
package echo

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// PeerAddr is the address a request came from, as the upstream saw it.
func PeerAddr(r *http.Request) (netip.Addr, error) {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("parsing remote address %q: %w", r.RemoteAddr, err)
	}
	return ap.Addr().Unmap(), nil
}

// Handler answers every request with its peer address and a newline, e.g.
// "2001:db8:1:2:1f3a:9c0e:77d2:1b05\n".
var Handler http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	peer, err := PeerAddr(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintln(w, peer)
})

// Recorder records the peer address of every request that reaches it, in
// arrival order. It is safe for concurrent use.
type Recorder struct {
	mu    sync.Mutex
	peers []netip.Addr
}

// Wrap returns a handler that records the peer address of each request and
// then serves it with next.
func (rec *Recorder) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if peer, err := PeerAddr(r); err == nil {
			rec.mu.Lock()
			rec.peers = append(rec.peers, peer)
			rec.mu.Unlock()
		}
		next.ServeHTTP(w, r)
	})
}

// Peers returns a copy of the recorded peer addresses.
func (rec *Recorder) Peers() []netip.Addr {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return slices.Clone(rec.peers)
}

// Reset forgets every recorded address.
func (rec *Recorder) Reset() {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.peers = nil
}

// SelfSigned makes a self-signed certificate, valid for a day, for the given
// DNS names and IP literals. It returns the certificate for a server and the
// same certificate PEM-encoded, for clients to trust (curl --cacert, wget
// --ca-certificate, an x509.CertPool).
func SelfSigned(hosts ...string) (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("generating key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("drawing serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "egressd test upstream"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("creating certificate: %w", err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("encoding key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("loading key pair: %w", err)
	}
	return cert, certPEM, nil
}
