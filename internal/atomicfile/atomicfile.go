// Package atomicfile replaces small files (state records) so that a reader,
// or a process started after a crash at any instant, sees either the old
// content or all of the new: the data is written to a temporary file on the
// same filesystem, then renamed over the target. Whether the file and the
// rename are also made durable against a power failure (fsync) is the
// caller's choice, as it costs a disk flush each.
package atomicfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Options tune Write.
type Options struct {
	// TempDir is the directory of the temporary file, on the same
	// filesystem as the target, so that a crash leaves its debris there
	// (a directory the caller sweeps). Empty: the target's directory, where
	// the debris is named after the target with a ".tmp-" suffix.
	TempDir string
	// Sync fsyncs the file before it is renamed into place: after a power
	// failure the target has either the old content or all of the new,
	// never an empty or torn file.
	Sync bool
	// SyncDir fsyncs the target's directory after the rename, making the
	// rename itself durable.
	SyncDir bool
}

// testHookBeforeRename, if set, is called with the temporary file's name
// once it holds all of the data, before the rename.
var testHookBeforeRename func(tmp string)

// Write replaces path with data, with permissions perm (whatever the
// umask). On an error the temporary file is removed and path is as it was.
func Write(path string, data []byte, perm fs.FileMode, opt Options) error {
	if err := write(path, data, perm, opt); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func write(path string, data []byte, perm fs.FileMode, opt Options) error {
	dir := opt.TempDir
	pattern := filepath.Base(path) + "-"
	if dir == "" {
		dir = filepath.Dir(path)
		pattern = filepath.Base(path) + ".tmp-"
	}
	f, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if opt.Sync {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	if testHookBeforeRename != nil {
		testHookBeforeRename(tmp)
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	if opt.SyncDir {
		return SyncDir(filepath.Dir(path))
	}
	return nil
}

// WriteJSON writes v as indented JSON (two spaces, a trailing newline) with
// Write.
func WriteJSON(path string, v any, perm fs.FileMode, opt Options) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return Write(path, append(data, '\n'), perm, opt)
}

// SyncDir fsyncs a directory, making the renames, creations and removals in
// it durable. A missing directory is an error (fs.ErrNotExist).
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory: %w", err)
	}
	return nil
}

// ReadJSON decodes the JSON file at path into v. found is false and err nil
// when there is no such file; false with the error when it cannot be read.
// A file that is read but does not decode (empty, or torn by a power failure
// after a Write without Sync) gives found true and the decode error, wrapped
// with path: a caller that treats a torn file as absent tests for found &&
// err != nil.
func ReadJSON(path string, v any) (found bool, err error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return true, fmt.Errorf("decode %s (%d bytes): %w", path, len(data), err)
	}
	return true, nil
}
