package layercache

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// TestReadJSONTornIsAbsent: a state file that is missing, empty or torn
// (written without fsync when the power failed) reads as absent; one that
// cannot be read is an error.
func TestReadJSONTornIsAbsent(t *testing.T) {
	dir := t.TempDir()
	var rec ownerRecord
	for name, content := range map[string]string{"empty": "", "torn": `{"owner": "v`} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := readJSON(p, &rec); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("readJSON(%s) = %v, want fs.ErrNotExist", name, err)
		}
	}
	if err := readJSON(filepath.Join(dir, "missing"), &rec); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("readJSON(missing) = %v, want fs.ErrNotExist", err)
	}
	if err := readJSON(dir, &rec); err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("readJSON(a directory) = %v, want an error other than fs.ErrNotExist", err)
	}
	s := &Store{work: t.TempDir()}
	p := filepath.Join(dir, "good")
	if err := s.writeAtomic(p, []byte(`{"owner": "v1"}`)); err != nil {
		t.Fatal(err)
	}
	if err := readJSON(p, &rec); err != nil || rec.Owner != "v1" {
		t.Errorf("readJSON(good) = %v, %+v", err, rec)
	}
	if st, err := os.Stat(p); err != nil || st.Mode() != 0o644 {
		t.Errorf("state file mode: %v, %v; want -rw-r--r--", st, err)
	}
}
