# egressd: `make help` lists the targets.
GO      ?= go
BIN     := bin
PKGS    := ./...
# Integration tests build network namespaces and need root; CI runs as root.
TESTFLAGS ?= -race -count=1 -timeout 15m
SOAKTIME  ?= 10m
# The packages whose tests build network namespaces. The kernel's IPv6
# neighbour table is one for every namespace, and on-link rotation in one
# package fills it with entries that another package's SYNs then wait for:
# `make test` runs these one package at a time (their tests still run in
# parallel inside each), the others all at once.
NSPKGS  := ./test/... ./deploy/... ./bench/...
UNITPKGS = $(filter-out $(shell $(GO) list $(NSPKGS)),$(shell $(GO) list $(PKGS)))
# Static binaries (no cgo: no libc to link, no glibc version to require), so
# that what `make build` makes runs on any Linux server of its architecture.
BUILD   := CGO_ENABLED=0 $(GO) build
# The staticcheck that make lint runs; make tools installs it.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: help build test unit demo bench bench-addrcost bench-smoke soak fuzz fuzz-smoke vet lint tools fmt clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## build egressd, egressctl and the demo upstream into bin/, static (CGO_ENABLED=0)
	$(BUILD) -o $(BIN)/egressd ./cmd/egressd
	$(BUILD) -o $(BIN)/egressctl ./cmd/egressctl
	$(BUILD) -o $(BIN)/echo-upstream ./test/upstream

test: lint ## vet and staticcheck, then every test (unit, then namespace integration a package at a time; root for the latter), then the benchmarks once each and the fuzz targets briefly
	$(GO) test $(TESTFLAGS) $(UNITPKGS)
	$(GO) test $(TESTFLAGS) -p 1 $(NSPKGS)
	$(MAKE) bench-smoke
	$(MAKE) fuzz-smoke

unit: ## the tests that need no root
	$(GO) test -count=1 $(UNITPKGS)

demo: build ## run egressd in throw-away namespaces and show each request leaving from a fresh address (root)
	bash test/demo.sh $(BIN)/egressd $(BIN)/echo-upstream $(BIN)/egressctl

bench: ## the Go benchmarks, then egressd against no proxy, tinyproxy and Squid into bench/results/compare.* (root, about 30 min)
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./netutil/... ./proxy/...
	$(GO) test -run '^$$' -bench . -benchtime 5000x -count 3 ./test/
	sh bench/install-deps.sh
	$(GO) test -count=1 -timeout 90m -run TestCompare ./bench/compare -args -full -out $(CURDIR)/bench/results

bench-addrcost: ## the kernel's cost of one egress address add and delete, by addresses on the interface (root)
	$(GO) run ./bench/addrcost

soak: ## 64 clients of mixed HTTP, CONNECT and SOCKS5 for SOAKTIME (10m), printing RSS, goroutines, fds and live addresses every 10 s (root; CI runs a minute of it)
	$(GO) test -count=1 -v -timeout 60m -run '^TestSoak$$' ./test/ -args -soak $(SOAKTIME)

bench-smoke: ## every benchmark once, so none of them rots
	$(GO) test -short -run '^$$' -bench . -benchtime 1x ./netutil/... ./proxy/... ./test/

# Fuzzing: test/fuzz.sh finds every `func FuzzXxx` (a new one needs no edit
# here) and fuzzes each in turn; the seed corpora are testdata/fuzz/FuzzXxx/.
FUZZTIME ?= 30s

fuzz: ## every fuzz target for FUZZTIME each (default 30s): make fuzz FUZZTIME=10m
	GO=$(GO) bash test/fuzz.sh $(FUZZTIME)

fuzz-smoke: ## every fuzz target for 2s (no -race), so that CI runs each
	GO=$(GO) bash test/fuzz.sh 2s

vet: ## go vet and a gofmt check
	$(GO) vet $(PKGS)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi

lint: vet ## vet, then staticcheck (make tools installs it)
	@PATH="$$PATH:$$($(GO) env GOPATH)/bin"; \
	if ! command -v staticcheck >/dev/null; then echo "lint: staticcheck is not installed: run make tools"; exit 1; fi; \
	staticcheck $(PKGS)

tools: ## install the linter make lint runs (staticcheck, from the Go module proxy) into $(go env GOPATH)/bin
	$(GO) install $(STATICCHECK)

fmt: ## gofmt the tree
	gofmt -w $$(git ls-files '*.go')

clean: ## remove build output
	rm -rf $(BIN)
