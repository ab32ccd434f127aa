import { execTied } from './host-pieces.ts';

export type EntryType = 'file' | 'directory' | 'symlink' | 'block-device' | 'char-device' | 'fifo' | 'socket';

/** One file as `files ls` reports it, read from the mounted guest filesystem. */
export interface FileEntry {
  name: string;
  /** The guest path: `/vda1/etc/hostname`. */
  path: string;
  type: EntryType;
  /** Permission bits with setuid/setgid/sticky, in octal ("0640"). */
  mode: string;
  uid: number;
  gid: number;
  sizeBytes: number;
  /** ISO 8601, millisecond precision. */
  mtime: string;
  /** Where a symlink points, as stored (unresolved). */
  symlinkTarget?: string;
}

const typeOf: Record<string, EntryType> = { f: 'file', d: 'directory', l: 'symlink', b: 'block-device', c: 'char-device', p: 'fifo', s: 'socket' };
/** find -printf fields, NUL-separated so that any file name (spaces, newlines, any bytes) comes back whole. */
const fields = ['%d', '%y', '%m', '%U', '%G', '%s', '%T@', '%l', '%f'];

/**
 * The entry at `hostPath` and, for a directory, its children (sorted by name). GNU find runs it, in a child
 * tied to us: this process serves the NBD reads under the mount and must not block its own threads on them.
 */
export async function listEntries(hostPath: string, guestPath: string, signal?: AbortSignal): Promise<{ self: FileEntry; children: FileEntry[] }> {
  const { stdout } = await execTied('find', [hostPath, '-maxdepth', '1', '-printf', fields.map((field) => `${field}\\0`).join('')], {
    code: 'FILES_MOUNT_FAILED',
    signal,
    timeoutMs: 600_000,
  });
  const values = stdout.split('\0');
  const entries: Array<{ depth: number; entry: FileEntry }> = [];
  for (let at = 0; at + fields.length <= values.length; at += fields.length) {
    const [depth, type, mode, uid, gid, size, mtime, target, name] = values.slice(at, at + fields.length) as [string, string, string, string, string, string, string, string, string];
    const isSelf = depth === '0';
    const entry: FileEntry = {
      name: isSelf ? guestPath.split('/').at(-1) || '/' : name,
      path: isSelf ? guestPath : `${guestPath.replace(/\/$/, '')}/${name}`,
      type: typeOf[type] ?? 'file',
      mode: mode.padStart(4, '0'),
      uid: Number(uid),
      gid: Number(gid),
      sizeBytes: Number(size),
      mtime: new Date(Math.round(Number(mtime) * 1000)).toISOString(),
      ...(type === 'l' ? { symlinkTarget: target } : {}),
    };
    entries.push({ depth: Number(depth), entry });
  }
  const self = entries.find((item) => item.depth === 0)?.entry;
  if (!self) throw new Error(`find printed nothing for ${hostPath}`);
  const children = entries.filter((item) => item.depth === 1).map((item) => item.entry);
  children.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return { self, children };
}

/** `drwxr-x---` from a type and octal permission bits, as ls -l shows them. */
export function modeString(type: EntryType, mode: string): string {
  const bits = parseInt(mode, 8);
  const letter = { file: '-', directory: 'd', symlink: 'l', 'block-device': 'b', 'char-device': 'c', fifo: 'p', socket: 's' }[type];
  const triplet = (shift: number, special: number, specialLetter: string) => {
    const r = bits & (4 << shift) ? 'r' : '-';
    const w = bits & (2 << shift) ? 'w' : '-';
    const x = bits & (1 << shift);
    const s = bits & special;
    return r + w + (s ? (x ? specialLetter : specialLetter.toUpperCase()) : x ? 'x' : '-');
  };
  return letter + triplet(6, 0o4000, 's') + triplet(3, 0o2000, 's') + triplet(0, 0o1000, 't');
}
