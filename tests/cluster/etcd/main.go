// Command etcd is the upstream etcd server, built from go.etcd.io/etcd/server/v3
// at the version pinned in ../versions.env. The etcd repository's own main
// module carries local replace directives and cannot be built as a dependency,
// so this wrapper calls the same entry point the release binary uses.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
