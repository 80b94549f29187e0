package unpack

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Directory times are set once all entries are in (creating a child changes
// its directory's mtime). A layer can hold millions of directories, so at
// most maxDirTimes of them are kept in memory: when the map is full it is
// appended to a spill file, an unnamed O_TMPFILE inode on the layer's own
// filesystem that never appears in the tree and is freed when closed. At the
// end the file is replayed in order, then the map: a directory given twice
// gets its last entry's times, as with the map alone.

// spillRecordSize is the fixed part of a spill record after the name
// length: inode, atime and mtime (seconds and nanoseconds each).
const spillRecordSize = 8 + 4*8

// recordDirTime remembers the times of the directory name (relative to the
// root), spilling the map to the file when it is full.
func (a *applier) recordDirTime(name string, dt dirTime) error {
	a.dirTimes[name] = dt
	a.stats.peakDirTimes = max(a.stats.peakDirTimes, len(a.dirTimes))
	if len(a.dirTimes) < maxDirTimes {
		return nil
	}
	if a.spill == nil {
		f, err := a.openSpill()
		if err != nil {
			return fmt.Errorf("more than %d directories: create the file that holds their times: %w", maxDirTimes, err)
		}
		a.spill, a.spillW = f, bufio.NewWriterSize(f, 64<<10)
	}
	var rec []byte
	for n, t := range a.dirTimes {
		rec = binary.LittleEndian.AppendUint32(rec[:0], uint32(len(n)))
		rec = append(rec, n...)
		rec = binary.LittleEndian.AppendUint64(rec, t.ino)
		for _, v := range []int64{t.atime.Sec, t.atime.Nsec, t.mtime.Sec, t.mtime.Nsec} {
			rec = binary.LittleEndian.AppendUint64(rec, uint64(v))
		}
		if _, err := a.spillW.Write(rec); err != nil {
			return fmt.Errorf("write directory times to %s: %w", a.spill.Name(), err)
		}
	}
	clear(a.dirTimes)
	return nil
}

// openSpill creates the spill file: O_TMPFILE in the layer directory, or,
// where the filesystem lacks it, a file next to the layer directory that is
// unlinked at once.
func (a *applier) openSpill() (*os.File, error) {
	fd, err := unix.Openat(a.rootfd, ".", unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err == nil {
		return os.NewFile(uintptr(fd), "directory times (O_TMPFILE in "+a.dir+")"), nil
	}
	f, cerr := os.CreateTemp(filepath.Dir(a.dir), ".dirtimes-*")
	if cerr != nil {
		return nil, fmt.Errorf("O_TMPFILE: %w; temporary file: %w", err, cerr)
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// closeSpill releases the spill file, if any.
func (a *applier) closeSpill() {
	if a.spill != nil {
		a.spill.Close()
		a.spill, a.spillW = nil, nil
	}
}

// applyDirTimes sets directory times once all children exist: those in the
// spill file in the order they were recorded, then those in memory.
func (a *applier) applyDirTimes() error {
	if a.spill != nil {
		if err := a.replaySpill(); err != nil {
			return err
		}
	}
	for name, dt := range a.dirTimes {
		if err := a.setDirTime(name, dt); err != nil {
			return err
		}
	}
	return nil
}

func (a *applier) replaySpill() error {
	if err := a.spillW.Flush(); err != nil {
		return fmt.Errorf("write directory times to %s: %w", a.spill.Name(), err)
	}
	if _, err := a.spill.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("read directory times from %s: %w", a.spill.Name(), err)
	}
	r := bufio.NewReaderSize(a.spill, 64<<10)
	var hdr [4]byte
	var fixed [spillRecordSize]byte
	var name []byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err == io.EOF {
			return nil
		} else if err != nil {
			return fmt.Errorf("read directory times from %s: %w", a.spill.Name(), err)
		}
		if n := int(binary.LittleEndian.Uint32(hdr[:])); cap(name) < n {
			name = make([]byte, n)
		} else {
			name = name[:n]
		}
		if _, err := io.ReadFull(r, name); err != nil {
			return fmt.Errorf("read directory times from %s: %w", a.spill.Name(), err)
		}
		if _, err := io.ReadFull(r, fixed[:]); err != nil {
			return fmt.Errorf("read directory times from %s: %w", a.spill.Name(), err)
		}
		u := func(i int) int64 { return int64(binary.LittleEndian.Uint64(fixed[8+8*i:])) }
		dt := dirTime{
			ino:   binary.LittleEndian.Uint64(fixed[:8]),
			atime: unix.Timespec{Sec: u(0), Nsec: u(1)},
			mtime: unix.Timespec{Sec: u(2), Nsec: u(3)},
		}
		if err := a.setDirTime(string(name), dt); err != nil {
			return err
		}
	}
}

// setDirTime sets the times of the directory name, if it is still the one
// they were recorded for.
func (a *applier) setDirTime(name string, dt dirTime) error {
	fd := a.rootfd
	if name != "." {
		var err error
		fd, err = a.openBeneath(name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		if err != nil {
			// A later entry removed or replaced the directory.
			return nil
		}
	}
	var st unix.Stat_t
	err := unix.Fstat(fd, &st)
	if err == nil && st.Ino == dt.ino {
		// AT_EMPTY_PATH works on the O_PATH fd, where futimens would not.
		err = unix.UtimesNanoAt(fd, "", []unix.Timespec{dt.atime, dt.mtime}, unix.AT_EMPTY_PATH)
	}
	if fd != a.rootfd {
		unix.Close(fd)
	}
	if err != nil {
		return entryErr(name, "set directory times", err)
	}
	return nil
}
