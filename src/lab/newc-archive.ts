/**
 * A writer for the "newc" cpio format the kernel unpacks as initramfs (kernel docs:
 * Documentation/driver-api/early-userspace/buffer-format.rst). Writing it here keeps the guest build free of
 * host tools and of the host's file owners and times: the same inputs give the same bytes.
 */
export type NewcEntry =
  | { kind: 'dir'; path: string; mode?: number }
  | { kind: 'file'; path: string; data: Buffer; mode?: number }
  | { kind: 'char-device'; path: string; major: number; minor: number; mode?: number };

const typeBits = { dir: 0o040000, file: 0o100000, 'char-device': 0o020000 } as const;

export function newcArchive(entries: readonly NewcEntry[]): Buffer {
  const parts: Buffer[] = [];
  let inode = 1;
  const push = (name: string, mode: number, data: Buffer, rdevMajor = 0, rdevMinor = 0, nlink = 1): void => {
    const nameBytes = Buffer.from(`${name}\0`);
    const fields = [inode++, mode, 0, 0, nlink, 0, data.length, 0, 0, rdevMajor, rdevMinor, nameBytes.length, 0];
    const header = Buffer.from(`070701${fields.map((field) => field.toString(16).padStart(8, '0')).join('')}`, 'ascii');
    parts.push(header, nameBytes, zeros(pad4(header.length + nameBytes.length)), data, zeros(pad4(data.length)));
  };
  for (const entry of entries) {
    const name = entry.path.replace(/^\/+/, '');
    if (entry.kind === 'dir') push(name, typeBits.dir | (entry.mode ?? 0o755), Buffer.alloc(0), 0, 0, 2);
    else if (entry.kind === 'file') push(name, typeBits.file | (entry.mode ?? 0o644), entry.data);
    else push(name, typeBits['char-device'] | (entry.mode ?? 0o600), Buffer.alloc(0), entry.major, entry.minor);
  }
  inode = 0;
  push('TRAILER!!!', 0, Buffer.alloc(0), 0, 0, 1);
  return Buffer.concat(parts);
}

function pad4(length: number): number {
  return (4 - (length % 4)) % 4;
}
function zeros(length: number): Buffer {
  return Buffer.alloc(length);
}
