// Command hostpath-provisioner is the local cluster's default StorageClass: a dynamic
// provisioner that gives each PersistentVolumeClaim of class `orchestrator-local` a fresh
// directory under --root on the node, as a hostPath PersistentVolume pinned to that node,
// and removes the directory when the volume is released (reclaimPolicy Delete).
//
// Why our own (about 100 lines) on SIG Storage's provisioner library instead of rancher's
// local-path-provisioner: that one makes the directories from helper pods it starts from a
// busybox image, which this cluster cannot pull (no registry) and which would need a
// writable hostPath in a pod; this runs on the node like the kubelet (started by `up`),
// creates the directory itself, and leaves the claim/volume protocol (binding, retries,
// leader election, finalizers) to the library every external provisioner uses.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"
)

type hostPath struct {
	root string
	node string
}

func (p *hostPath) Provision(ctx context.Context, opts controller.ProvisionOptions) (*v1.PersistentVolume, controller.ProvisioningState, error) {
	dir := filepath.Join(p.root, opts.PVName)
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return nil, controller.ProvisioningFinished, err
	}
	// a hostPath volume gets no fsGroup ownership: any pod user must be able to write
	if err := os.Chmod(dir, 0o777); err != nil {
		return nil, controller.ProvisioningFinished, err
	}
	reclaim := v1.PersistentVolumeReclaimDelete
	if opts.StorageClass.ReclaimPolicy != nil {
		reclaim = *opts.StorageClass.ReclaimPolicy
	}
	kind := v1.HostPathDirectory
	pv := &v1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: opts.PVName},
		Spec: v1.PersistentVolumeSpec{
			PersistentVolumeReclaimPolicy: reclaim,
			AccessModes:                   opts.PVC.Spec.AccessModes,
			Capacity: v1.ResourceList{
				v1.ResourceStorage: opts.PVC.Spec.Resources.Requests[v1.ResourceStorage],
			},
			PersistentVolumeSource: v1.PersistentVolumeSource{
				HostPath: &v1.HostPathVolumeSource{Path: dir, Type: &kind},
			},
			NodeAffinity: &v1.VolumeNodeAffinity{Required: &v1.NodeSelector{
				NodeSelectorTerms: []v1.NodeSelectorTerm{{MatchExpressions: []v1.NodeSelectorRequirement{{
					Key: "kubernetes.io/hostname", Operator: v1.NodeSelectorOpIn, Values: []string{p.node},
				}}}},
			}},
		},
	}
	return pv, controller.ProvisioningFinished, nil
}

func (p *hostPath) Delete(ctx context.Context, pv *v1.PersistentVolume) error {
	if pv.Spec.HostPath == nil {
		return errors.New("not a hostPath volume")
	}
	dir := filepath.Clean(pv.Spec.HostPath.Path)
	if !strings.HasPrefix(dir, p.root+string(filepath.Separator)) {
		return fmt.Errorf("%s is not under %s: left alone", dir, p.root)
	}
	return os.RemoveAll(dir)
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the cluster")
	root := flag.String("root", "", "directory holding the volumes")
	node := flag.String("node", "", "the node the volumes are on")
	name := flag.String("name", "orchestrator.local/hostpath", "provisioner name")
	klog.InitFlags(nil)
	flag.Parse()
	if *root == "" || *node == "" {
		klog.Fatal("--root and --node are required")
	}
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		klog.Fatal(err)
	}
	client := kubernetes.NewForConfigOrDie(config)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := os.MkdirAll(*root, 0o755); err != nil {
		klog.Fatal(err)
	}
	p := &hostPath{root: filepath.Clean(*root), node: *node}
	pc := controller.NewProvisionController(ctx, client, *name, p, controller.LeaderElection(false))
	pc.Run(ctx)
}
