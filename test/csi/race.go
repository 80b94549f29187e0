//go:build race

package csitest

// RaceEnabled is true when the tests run with -race: the plugin is then
// built with the race detector too.
const RaceEnabled = true
