package compare

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/egressd/egressd/test/nstest"
)

// loadResult is the JSON bench/load prints.
type loadResult struct {
	Requests     int64    `json:"requests"`
	Errors       int64    `json:"errors"`
	PerSec       float64  `json:"per_sec"`
	P50ms        float64  `json:"p50_ms"`
	P99ms        float64  `json:"p99_ms"`
	MBps         float64  `json:"mb_per_s"`
	Opened       int64    `json:"opened"`
	CPUms        float64  `json:"cpu_ms"`
	ErrorSamples []string `json:"error_samples"`
}

// takesPart reports whether s is measured in sc.
func (b *bench) takesPart(sc Scenario, s *system) bool {
	return sc != Idle || (s.proc != nil && !s.perRequest)
}

// measure runs scenario sc once against s.
func (b *bench) measure(sc Scenario, s *system, run int) (Sample, bool) {
	if !b.takesPart(sc, s) {
		return Sample{}, false
	}
	if sc == Idle {
		return b.idle(s, run), true
	}
	length := []string{"-d", b.p.duration.String()}
	args := append([]string{"-mode", "small", "-c", strconv.Itoa(b.p.smallC)}, length...)
	switch sc {
	case Tunnel:
		args = append([]string{"-mode", "tunnel", "-c", strconv.Itoa(b.p.tunnelC), "-ca", b.caFile}, length...)
	case Download:
		args = []string{"-mode", "download", "-bytes", strconv.FormatInt(b.p.downloadBytes, 10), "-timeout", "10m"}
	}
	neigh := b.watchNeighbours(s)
	cpu0 := procCPU(s)
	lr, err := b.runLoad(s, args, b.p.duration+10*time.Minute)
	sample := Sample{Scenario: sc.ID, System: s.name, Run: run, ProxyCPUms: procCPU(s) - cpu0, RouterNeigh: neigh()}
	if err != nil {
		sample.Errors, sample.Note = 1, err.Error()
		return sample, true
	}
	sample.Value, sample.P50ms, sample.P99ms = lr.PerSec, lr.P50ms, lr.P99ms
	if sc == Download {
		sample.Value, sample.P50ms, sample.P99ms = lr.MBps, 0, 0
	}
	sample.Requests, sample.Errors, sample.LoadCPUms = lr.Requests, lr.Errors, lr.CPUms
	sample.Note = strings.Join(lr.ErrorSamples, "; ")
	return sample, true
}

// runLoad runs the load generator in H against s and returns its result.
func (b *bench) runLoad(s *system, args []string, timeout time.Duration) (loadResult, error) {
	args = append(args, "-proxy", s.proxyURL())
	if s.session {
		args = append(args, "-session")
	}
	p := b.tp.Host.Start(b.t, nil, b.load, args...)
	select {
	case <-p.Done():
	case <-time.After(timeout):
		p.Signal(syscall.SIGKILL)
		<-p.Done()
		return loadResult{}, fmt.Errorf("load %s did not finish in %v", strings.Join(args, " "), timeout)
	}
	var lr loadResult
	if err := json.Unmarshal([]byte(p.Stdout()), &lr); err != nil {
		return lr, fmt.Errorf("load %s: %s", strings.Join(args, " "), strings.TrimSpace(p.Stderr()))
	}
	return lr, nil
}

// idle is (d): N CONNECT tunnels to the upstream's hold port, and the
// proxy's memory and descriptors after all are open, less before, per
// tunnel.
func (b *bench) idle(s *system, run int) Sample {
	sample := Sample{Scenario: Idle.ID, System: s.name, Run: run}
	before := procMem(s.proc.Pid)
	args := []string{"-mode", "idle", "-n", strconv.Itoa(b.p.idleN), "-c", "64", "-max-errors", "64", "-proxy", s.proxyURL()}
	if s.session {
		args = append(args, "-session")
	}
	p := b.tp.Host.Start(b.t, nil, b.load, args...)
	defer func() {
		p.Signal(syscall.SIGTERM)
		p.Wait(b.t)
		b.waitSettled(s, before.fds)
	}()
	deadline := time.Now().Add(10 * time.Minute)
	for !strings.Contains(p.Stdout(), "\n") {
		if p.Exited() || time.Now().After(deadline) {
			sample.Errors, sample.Note = 1, "load -mode idle: "+strings.TrimSpace(p.Stderr())
			return sample
		}
		time.Sleep(50 * time.Millisecond)
	}
	var lr loadResult
	if err := json.Unmarshal([]byte(p.Stdout()), &lr); err != nil {
		sample.Errors, sample.Note = 1, err.Error()
		return sample
	}
	// Let the proxy finish its side of the last tunnels.
	time.Sleep(time.Second)
	after := procMem(s.proc.Pid)
	sample.Tunnels, sample.Errors, sample.LoadCPUms = lr.Opened, lr.Errors, lr.CPUms
	sample.Note = strings.Join(lr.ErrorSamples, "; ")
	if lr.Opened > 0 {
		n := float64(lr.Opened)
		sample.Value = float64(after.rssKiB-before.rssKiB) / n
		sample.PssKiB = float64(after.pssKiB-before.pssKiB) / n
		sample.FDsPerTun = float64(after.fds-before.fds) / n
	}
	return sample
}

// waitSettled waits, at most nstest.Guard, until the proxy has closed its
// side of the idle tunnels, so that the next run starts from the same
// place: until its descriptors are back to fds or stop falling for a
// second (Go keeps splice pipes in a pool until a garbage collection).
func (b *bench) waitSettled(s *system, fds int) {
	deadline := time.Now().Add(nstest.Guard)
	last, since := procMem(s.proc.Pid).fds, time.Now()
	for last > fds+16 && time.Since(since) < time.Second && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		if n := procMem(s.proc.Pid).fds; n < last {
			last, since = n, time.Now()
		}
	}
}

// watchNeighbours samples R's neighbour entries for an on-link system's
// prefix every second until the returned function is called, which gives
// their peak (0 for the others).
func (b *bench) watchNeighbours(s *system) (peak func() int) {
	if !s.onLink.IsValid() {
		return func() int { return 0 }
	}
	stop := b.tp.WatchNeighbours(s.onLink, time.Second)
	return func() int { return slices.Max(stop()) }
}

// procCPU is the process's user plus system CPU time in milliseconds, 0
// without a process. Fields 14 and 15 of /proc/PID/stat, in clock ticks
// (USER_HZ, 100 on Linux).
func procCPU(s *system) float64 {
	if s.proc == nil {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.proc.Pid))
	if err != nil {
		return 0
	}
	// The command name, field 2, may hold spaces: count after its ')'.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) * 10
}

type mem struct {
	rssKiB, pssKiB int64
	fds            int
}

// procMem reads VmRSS from /proc/PID/status, Pss from
// /proc/PID/smaps_rollup and counts /proc/PID/fd.
func procMem(pid int) mem {
	var m mem
	m.rssKiB = kiB(fmt.Sprintf("/proc/%d/status", pid), "VmRSS:")
	m.pssKiB = kiB(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss:")
	if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		m.fds = len(fds)
	}
	return m
}

// kiB returns the figure of the line of file that starts with key
// ("VmRSS:   1234 kB").
func kiB(file, key string) int64 {
	f, err := os.Open(file)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), key); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return n
		}
	}
	return 0
}
