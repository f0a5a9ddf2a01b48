package stats

// SampleStats is sampleStats for the tests of package stats_test.
var SampleStats = sampleStats
