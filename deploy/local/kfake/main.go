// A second, independent Kafka-protocol broker for the test suite: franz-go's kfake (an
// in-process Kafka implementation in Go), served on loopback. The product speaks only the
// Kafka protocol, so its pipeline must give the same results here as on Apache Kafka.
//
//	go build -o kfake-broker . && ./kfake-broker -port 19192 -data-dir /tmp/kfake
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/twmb/franz-go/pkg/kfake"
)

func main() {
	port := flag.Int("port", 19192, "port on 127.0.0.1")
	dataDir := flag.String("data-dir", "", "persist topics and offsets here (survives restarts)")
	partitions := flag.Int("partitions", 4, "partitions of auto-created topics")
	logLevel := flag.String("log-level", "warn", "none, error, warn, info or debug")
	flag.Parse()

	levels := map[string]kfake.LogLevel{"none": kfake.LogLevelNone, "error": kfake.LogLevelError,
		"warn": kfake.LogLevelWarn, "info": kfake.LogLevelInfo, "debug": kfake.LogLevelDebug}
	level, ok := levels[*logLevel]
	if !ok {
		fmt.Fprintf(os.Stderr, "kfake-broker: unknown -log-level %q\n", *logLevel)
		os.Exit(2)
	}
	opts := []kfake.Opt{
		kfake.Ports(*port),
		kfake.NumBrokers(1),
		kfake.DefaultNumPartitions(*partitions),
		kfake.WithLogger(kfake.BasicLogger(os.Stderr, level)),
	}
	if *dataDir != "" {
		opts = append(opts, kfake.DataDir(*dataDir))
	}
	cluster, err := kfake.NewCluster(opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kfake-broker: %v\n", err)
		os.Exit(1)
	}
	for _, addr := range cluster.ListenAddrs() {
		fmt.Println("listening on", addr)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	<-sigs
	cluster.Close()
}
