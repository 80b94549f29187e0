package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/strata-csi/strata/driver/credentials/dockerconfig"
	"github.com/strata-csi/strata/layercache"
)

func init() {
	register(&command{
		name:    "pull",
		args:    "REF",
		summary: "Pull an image's layers into the cache",
		flags:   pullFlags,
	})
}

// stringList is a flag that may be repeated.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func pullFlags(fs *flag.FlagSet) func(context.Context, *env, []string) error {
	policy := fs.String("policy", string(layercache.PullIfNotPresent),
		"when to contact the registry: IfNotPresent (use the cached resolution of a tag), Always (re-resolve the tag), Never (cache only)")
	concurrency := fs.Int("concurrency", layercache.DefaultConcurrency, "layers fetched and unpacked at once")
	var insecure stringList
	fs.Var(&insecure, "insecure-registry", "reach this registry (host or host:port) over plain HTTP; repeatable (loopback registries always are)")
	username := fs.String("username", "", "user name for the registry (the password is read from stdin with --password-stdin)")
	passwordStdin := fs.Bool("password-stdin", false, "read the registry password from stdin")
	dockerConfig := fs.String("docker-config", "", "read credentials from this dockerconfigjson file (the content of a kubernetes.io/dockerconfigjson secret)")
	// The same budget and limits as the plugin's, with the same defaults:
	// a pull here fills the same disk.
	maxBytes := fs.String("cache-max-bytes", "", "cache budget, e.g. 50Gi, as the plugin's --cache-max-bytes: unused layers are evicted past it, and a pull that cannot fit fails as it unpacks; replaces --cache-max-percent (0 = unbounded)")
	maxPercent := fs.Float64("cache-max-percent", layercache.DefaultMaxPercent, "cache budget as a percentage of the cache's filesystem, unless --cache-max-bytes is given (0 = unbounded)")
	maxExpand := fs.Float64("layer-max-expansion", layercache.DefaultMaxExpansion, "most times its compressed size that one layer may take unpacked, never under 64 MiB (0 = no ceiling)")
	layerMax := fs.String("layer-max-bytes", layercache.FormatBytes(layercache.DefaultMaxLayerBytes), "most that one layer may take unpacked (0 = no limit)")

	return func(ctx context.Context, e *env, args []string) error {
		cmd := commands["pull"]
		if len(args) != 1 {
			return usagef(cmd, "pull needs exactly one image reference, got %d arguments", len(args))
		}
		ref := args[0]
		pol, err := layercache.ParsePullPolicy(*policy)
		if err != nil {
			return usagef(cmd, "--policy: %v", err)
		}
		if *concurrency < 1 {
			return usagef(cmd, "--concurrency must be at least 1, got %d", *concurrency)
		}
		creds, err := credentials(cmd, e.stdin, *username, *passwordStdin, *dockerConfig, ref)
		if err != nil {
			return err
		}

		budget, limits, err := pullBudget(cmd, e.root, fs, *maxBytes, *maxPercent, *maxExpand, *layerMax)
		if err != nil {
			return err
		}

		s, err := e.open(layercache.WithConcurrency(*concurrency), layercache.WithInsecureRegistries(insecure...),
			layercache.WithBudget(budget), layercache.WithLayerLimits(limits))
		if err != nil {
			return err
		}
		o := layercache.PullOptions{Policy: pol, Keychain: creds}
		img, err := s.Resolve(ctx, ref, o)
		if err != nil {
			return err
		}
		p := newProgress(e.stdout, e.tty, img)
		o.Progress = p.event
		err = s.Ensure(ctx, img, o)
		p.stop()
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, p.summary(img))
		return nil
	}
}

// pullBudget turns pull's budget flags into the cache's budget and layer
// limits, as the plugin does.
func pullBudget(cmd *command, root string, fs *flag.FlagSet, maxBytes string, percent, expansion float64, layerMax string) (layercache.Budget, layercache.Limits, error) {
	var b layercache.Budget
	percentSet := false
	fs.Visit(func(f *flag.Flag) { percentSet = percentSet || f.Name == "cache-max-percent" })
	switch {
	case maxBytes != "" && percentSet && percent != 0:
		return b, layercache.Limits{}, usagef(cmd, "--cache-max-bytes and --cache-max-percent both given: give the cache budget one way")
	case maxBytes != "":
		n, err := layercache.ParseBytes(maxBytes)
		if err != nil {
			return b, layercache.Limits{}, usagef(cmd, "--cache-max-bytes: %v", err)
		}
		b.MaxBytes = n
	case percent != 0:
		if err := os.MkdirAll(root, 0o700); err != nil {
			return b, layercache.Limits{}, fmt.Errorf("create the cache root: %w", err)
		}
		var err error
		if b, err = layercache.BudgetOf(b, percent, root); err != nil {
			return b, layercache.Limits{}, usagef(cmd, "--cache-max-percent: %v", err)
		}
	}
	n, err := layercache.ParseBytes(layerMax)
	if err != nil {
		return b, layercache.Limits{}, usagef(cmd, "--layer-max-bytes: %v", err)
	}
	return b, layercache.Limits{MaxExpansion: expansion, ExpansionFloor: layercache.DefaultExpansionFloor, MaxLayerBytes: n}, nil
}

// credentials builds the registry keychain of cmd from its flags; nil
// means anonymous. A docker config file is read as the plugin reads a pull
// secret (package dockerconfig); a username and password are for the
// registries of refs alone, never for their mirrors.
func credentials(cmd *command, stdin io.Reader, username string, passwordStdin bool, dockerConfig string, refs ...string) (authn.Keychain, error) {
	switch {
	case dockerConfig != "" && (username != "" || passwordStdin):
		return nil, usagef(cmd, "use either --docker-config or --username/--password-stdin, not both")
	case passwordStdin && username == "":
		return nil, usagef(cmd, "--password-stdin needs --username")
	case username != "" && !passwordStdin:
		return nil, usagef(cmd, "--username needs --password-stdin (a password on the command line would show in ps and shell history)")
	case dockerConfig != "":
		data, err := os.ReadFile(dockerConfig)
		if err != nil {
			return nil, fmt.Errorf("read --docker-config: %w", err)
		}
		kc := &dockerconfig.Keyring{}
		if err := kc.AddDockerConfig(data, false, "--docker-config "+dockerConfig); err != nil {
			// Refused, as the registry would refuse garbage.
			return nil, fmt.Errorf("%w: --docker-config %s: %v", layercache.ErrUnauthorized, dockerConfig, err)
		}
		return kc, nil
	case username != "":
		data, err := io.ReadAll(stdin)
		if err != nil {
			return nil, fmt.Errorf("read the password from stdin: %w", err)
		}
		pw := strings.TrimRight(string(data), "\r\n")
		if pw == "" {
			return nil, usagef(cmd, "--password-stdin: stdin holds no password")
		}
		var registries []string
		for _, ref := range refs {
			if r, err := name.ParseReference(ref); err == nil {
				registries = append(registries, r.Context().RegistryStr())
			}
		}
		return dockerconfig.ForRegistries(dockerconfig.Auth{Username: username, Password: pw}, registries...), nil
	}
	return nil, nil
}
