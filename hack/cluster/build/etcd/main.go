// Command etcd is etcd's server, built from the published go.etcd.io/etcd/server/v3
// module (Debian's etcd 3.4.23 is too old for Kubernetes 1.35).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
