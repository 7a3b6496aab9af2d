// Command kube-network-policies-xt enforces Kubernetes NetworkPolicy on the local cluster
// with the policy engine of sigs.k8s.io/kube-network-policies (SIG Network's reference
// implementation: its standard NetworkPolicy evaluator, pod resolver and packet parser)
// and a small dataplane of our own.
//
// Why not upstream's own binary: its dataplane diverts new connections to userspace with
// nftables' native `queue` expression, and this kernel has no nft_queue
// (CONFIG_NFT_QUEUE is not set, and modules are disabled). Its whole ruleset is one
// netlink batch, so the batch fails ("netlink receive: no such file or directory"),
// nothing is installed and nothing is enforced; it retries every second forever.
// The kernel does have nf_tables, nft_compat and the xtables NFQUEUE target, so this
// dataplane builds the same two chains (postrouting for forwarded and bridged traffic,
// input for traffic from pods to the node itself) in its own nftables table and diverts
// with the NFQUEUE target through nft_compat. Everything else is upstream's.
//
// Differences from upstream's dataplane, all on the strict side:
//   - every new connection from or to the pod range is diverted (not only pods selected
//     by a policy), so a pod is covered from its first packet;
//   - a packet from a pod-range address that no pod owns yet (a pod whose IP has not
//     reached the API server) is dropped instead of accepted: its policies are unknown;
//   - fail closed: without a listener on the queue the kernel drops diverted packets,
//     and on SIGTERM the table is removed (as upstream does with --fail-open=false).
//
// Like upstream without strict mode, a verdict applies to a connection when it starts;
// established connections are not re-evaluated when policies change.
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"sigs.k8s.io/kube-network-policies/pkg/api"
	"sigs.k8s.io/kube-network-policies/pkg/network"
	"sigs.k8s.io/kube-network-policies/pkg/networkpolicy"
	"sigs.k8s.io/kube-network-policies/pkg/podinfo"
)

// xtNFQueueV3 is struct xt_NFQ_info_v3 {u16 queuenum; u16 queues_total; u16 flags},
// padded to XT_ALIGN (8 bytes) as iptables sends it.
func xtNFQueueV3(queue uint16) xt.Unknown {
	info := make([]byte, 8)
	binary.NativeEndian.PutUint16(info[0:], queue)
	binary.NativeEndian.PutUint16(info[2:], 1) // queues_total
	binary.NativeEndian.PutUint16(info[4:], 0) // flags: no bypass (fail closed)
	return xt.Unknown(info)
}

type options struct {
	kubeconfig string
	nodeName   string
	table      string
	queueID    int
	podCIDR    netip.Prefix
	podGateway netip.Addr
	cleanup    bool
}

func main() {
	os.Exit(run())
}

func run() int {
	klog.InitFlags(nil)
	var o options
	var podCIDR, podGateway string
	flag.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster")
	flag.StringVar(&o.nodeName, "hostname-override", "", "name of this node")
	flag.StringVar(&o.table, "table", "orchestrator-netpol", "nftables table (family ip) owned by this process")
	flag.IntVar(&o.queueID, "nfqueue-id", 100, "netfilter queue number")
	flag.StringVar(&podCIDR, "pod-cidr", "", "pod address range; new connections from or to it are evaluated")
	flag.StringVar(&podGateway, "pod-gateway", "", "the node's own address in the pod range (never a pod)")
	flag.BoolVar(&o.cleanup, "cleanup", false, "remove the nftables table and exit")
	flag.Parse()

	if o.cleanup {
		if err := deleteTable(o.table); err != nil {
			klog.ErrorS(err, "cleanup")
			return 1
		}
		return 0
	}
	var err error
	if o.podCIDR, err = netip.ParsePrefix(podCIDR); err != nil || !o.podCIDR.Addr().Is4() {
		klog.ErrorS(err, "--pod-cidr must be an IPv4 prefix", "value", podCIDR)
		return 1
	}
	if o.podGateway, err = netip.ParseAddr(podGateway); err != nil {
		klog.ErrorS(err, "--pod-gateway must be an address", "value", podGateway)
		return 1
	}
	if o.nodeName == "" || o.kubeconfig == "" {
		klog.Error("--hostname-override and --kubeconfig are required")
		return 1
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	if err := serve(ctx, o); err != nil {
		klog.ErrorS(err, "kube-network-policies-xt failed")
		return 1
	}
	return 0
}

func serve(ctx context.Context, o options) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The cluster's state dir holds the kubeconfig; when it is gone the cluster was torn
	// down (also by a `down` that does not know this process): stop, leaving no table.
	go wait.UntilWithContext(ctx, func(context.Context) {
		if _, err := os.Stat(o.kubeconfig); errors.Is(err, os.ErrNotExist) {
			klog.InfoS("kubeconfig removed: the cluster is gone", "kubeconfig", o.kubeconfig)
			cancel()
		}
	}, 2*time.Second)
	config, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	clientset, err := kubernetes.NewForConfig(config)
	if err != nil {
		return err
	}
	factory := informers.NewSharedInformerFactory(clientset, 0)
	nsInformer := factory.Core().V1().Namespaces()
	npInformer := factory.Networking().V1().NetworkPolicies()
	podInformer := factory.Core().V1().Pods()
	if err := podInformer.Informer().SetTransform(func(obj interface{}) (interface{}, error) {
		if accessor, err := meta.Accessor(obj); err == nil {
			accessor.SetManagedFields(nil)
		}
		return obj, nil
	}); err != nil {
		return err
	}
	resolver, err := podinfo.NewInformerResolver(podInformer.Informer())
	if err != nil {
		return err
	}
	pods := podinfo.NewInformerProvider(podInformer, nsInformer, nil, []podinfo.IPResolver{resolver})
	evaluators := []api.PolicyEvaluator{}
	if klog.V(2).Enabled() {
		evaluators = append(evaluators, networkpolicy.NewLoggingPolicy())
	}
	evaluators = append(evaluators,
		networkpolicy.NewStandardNetworkPolicy(o.nodeName, nsInformer, podInformer, npInformer))
	engine := networkpolicy.NewPolicyEngine(pods, evaluators)
	factory.Start(ctx.Done())

	klog.Info("waiting for the policy engine's informers")
	if err := wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true,
		func(context.Context) (bool, error) { return engine.Ready(), nil }); err != nil {
		if ctx.Err() != nil {
			return nil // stopped (signal, or the cluster is gone) before enforcing anything
		}
		return fmt.Errorf("policy engine never became ready: %w", err)
	}

	// Listen before diverting: a diverted packet without a listener is dropped.
	nf, err := nfqueue.Open(&nfqueue.Config{
		NfQueue:      uint16(o.queueID),
		Flags:        nfqueue.NfQaCfgFlagGSO,
		MaxPacketLen: 128, // headers only
		MaxQueueLen:  1024,
		Copymode:     nfqueue.NfQnlCopyPacket,
		WriteTimeout: 100 * time.Millisecond,
	})
	if err != nil {
		return fmt.Errorf("open nfqueue %d: %w", o.queueID, err)
	}
	defer nf.Close()

	verdict := func(a nfqueue.Attribute) int {
		v := nfqueue.NfDrop
		if a.PacketID == nil || a.Payload == nil {
			return 0
		}
		packet, err := network.ParsePacket(*a.Payload)
		if err == nil {
			packet.ID = *a.PacketID
			if allowed(ctx, o, engine, pods, &packet) {
				v = nfqueue.NfAccept
			}
		} else {
			klog.ErrorS(err, "unparsable packet dropped", "id", *a.PacketID)
		}
		if err := nf.SetVerdict(*a.PacketID, v); err != nil {
			klog.ErrorS(err, "set verdict", "id", *a.PacketID)
		}
		return 0
	}
	if err := nf.RegisterWithErrorFunc(ctx, verdict, func(err error) int {
		var opErr interface{ Timeout() bool }
		if errors.As(err, &opErr) && opErr.Timeout() {
			return 0
		}
		klog.ErrorS(err, "nfqueue receive")
		return 0
	}); err != nil {
		return fmt.Errorf("register nfqueue handler: %w", err)
	}

	if err := installTable(o); err != nil {
		return fmt.Errorf("install nftables table %s: %w", o.table, err)
	}
	klog.InfoS("enforcing NetworkPolicy", "table", o.table, "queue", o.queueID, "podCIDR", o.podCIDR, "node", o.nodeName)
	<-ctx.Done()
	klog.Info("stopping: removing the nftables table")
	return deleteTable(o.table)
}

// allowed is upstream's verdict, except that a source address in the pod range that no
// pod owns (yet) is refused: its labels, hence its policies, are not known.
func allowed(ctx context.Context, o options, engine *networkpolicy.PolicyEngine,
	pods api.PodInfoProvider, p *network.Packet) bool {
	if src, ok := netip.AddrFromSlice(p.SrcIP.To4()); ok && o.podCIDR.Contains(src) && src != o.podGateway {
		if _, known := pods.GetPodInfoByIP(p.SrcIP.String()); !known {
			klog.V(2).InfoS("drop: source is in the pod range but no known pod", "packet", p)
			return false
		}
	}
	ok, err := engine.EvaluatePacket(ctx, p)
	if err != nil {
		klog.ErrorS(err, "evaluate packet (dropped)", "packet", p)
		return false
	}
	if !ok {
		klog.V(1).InfoS("drop", "src", net.JoinHostPort(p.SrcIP.String(), fmt.Sprint(p.SrcPort)),
			"dst", net.JoinHostPort(p.DstIP.String(), fmt.Sprint(p.DstPort)), "proto", p.Proto)
	}
	return ok
}

// Rule building blocks (nftables register 1, as upstream's).
func ctStateNew() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func ipInPrefix(offset uint32, prefix netip.Prefix) []expr.Any {
	mask := net.CIDRMask(prefix.Bits(), 32)
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: prefix.Masked().Addr().AsSlice()},
	}
}

func concat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// installTable replaces the table in one netlink batch (add + delete + add flushes it).
func installTable(o options) error {
	nft, err := nftables.New()
	if err != nil {
		return err
	}
	table := &nftables.Table{Name: o.table, Family: nftables.TableFamilyIPv4}
	nft.AddTable(table)
	nft.DelTable(table)
	nft.AddTable(table)

	queue := []expr.Any{&expr.Target{Name: "NFQUEUE", Rev: 3, Info: ptr(xtNFQueueV3(uint16(o.queueID)))}}
	rootAccept := []expr.Any{
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 0, 0, 0}},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
	const saddr, daddr = 12, 16

	// Forwarded and bridged traffic, after DNAT (destination = the Service's endpoint) and
	// before SNAT, as upstream. Locally generated packets of root processes (the kubelet's
	// probes) are not evaluated, as upstream.
	post := nft.AddChain(&nftables.Chain{
		Name: "postrouting", Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityNATSource - 5),
	})
	nft.AddRule(&nftables.Rule{Table: table, Chain: post, Exprs: rootAccept})
	nft.AddRule(&nftables.Rule{Table: table, Chain: post, Exprs: concat(ctStateNew(), ipInPrefix(saddr, o.podCIDR), queue)})
	nft.AddRule(&nftables.Rule{Table: table, Chain: post, Exprs: concat(ctStateNew(), ipInPrefix(daddr, o.podCIDR), queue)})

	// Traffic from pods to the node itself (the API server's node address, the kubelet,
	// and Services DNATed to them), which never reaches postrouting.
	input := nft.AddChain(&nftables.Chain{
		Name: "input", Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityNATSource + 1),
	})
	nft.AddRule(&nftables.Rule{Table: table, Chain: input, Exprs: concat(ctStateNew(), ipInPrefix(saddr, o.podCIDR), queue)})
	return nft.Flush()
}

func ptr(u xt.Unknown) *xt.Unknown { return &u }

func deleteTable(name string) error {
	nft, err := nftables.New()
	if err != nil {
		return err
	}
	table := &nftables.Table{Name: name, Family: nftables.TableFamilyIPv4}
	nft.AddTable(table) // add + delete: no error when it does not exist
	nft.DelTable(table)
	if err := nft.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return err
	}
	return nil
}
