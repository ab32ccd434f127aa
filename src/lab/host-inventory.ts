import { promises as fs } from 'node:fs';
import { exec } from '../core/exec.ts';

/** One attached loop device and the file behind it (losetup --list --json). */
export interface LoopDevice {
  name: string;
  backingFile: string;
}

/** Every loop device attached on this host, from `losetup --list --json`. */
export async function listLoopDevices(): Promise<LoopDevice[]> {
  const { stdout } = await exec('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE']);
  if (stdout.trim() === '') return [];
  const parsed = JSON.parse(stdout) as { loopdevices?: Array<{ name?: unknown; 'back-file'?: unknown }> };
  return (parsed.loopdevices ?? []).flatMap((entry) =>
    typeof entry.name === 'string' && typeof entry['back-file'] === 'string'
      ? // the kernel appends " (deleted)" when the backing file was unlinked while attached
        [{ name: entry.name, backingFile: entry['back-file'].replace(/ \(deleted\)$/, '') }]
      : [],
  );
}

/** Loop devices whose backing file is `file`: how down finds a loop a crash kept us from recording. */
export async function loopDevicesBackedBy(file: string): Promise<string[]> {
  return (await listLoopDevices()).filter((loop) => loop.backingFile === file).map((loop) => loop.name);
}

export interface MountEntry {
  source: string;
  mountPoint: string;
  fsType: string;
}

/** /proc/mounts, with its octal escapes (\040 for a space) decoded. */
export async function listMounts(): Promise<MountEntry[]> {
  const text = await fs.readFile('/proc/mounts', 'utf8');
  const unescape = (field: string): string => field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
  return text
    .split('\n')
    .filter((line) => line.trim() !== '')
    .map((line) => {
      const [source = '', mountPoint = '', fsType = ''] = line.split(' ');
      return { source: unescape(source), mountPoint: unescape(mountPoint), fsType };
    });
}

export async function isMounted(mountPoint: string): Promise<boolean> {
  return (await listMounts()).some((entry) => entry.mountPoint === mountPoint);
}
