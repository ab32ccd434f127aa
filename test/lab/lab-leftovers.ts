// Test helper (not a test file): what a lab left on the host, listed from the host itself, not from our state.
import { promises as fs } from 'node:fs';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { listLoopDevices, listMounts } from '../../src/lab/index.ts';
import { readLabState } from '../../src/lab/lab-state.ts';

const run = promisify(execFile);

export const snapshiftBin = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/snapshift');

export interface Leftovers {
  mounts: string[];
  loops: string[];
  livePids: number[];
}

/** Mounts under `dir`, loop devices backed by files under `dir`, and which of `pids` still run (not zombies). */
export async function leftovers(dir: string, pids: readonly number[] = []): Promise<Leftovers> {
  const inside = (file: string): boolean => file === dir || file.startsWith(`${dir}/`);
  const mounts = (await listMounts()).filter((m) => inside(m.mountPoint)).map((m) => m.mountPoint);
  // Cross-check our parser with losetup's plain listing: "/dev/loop0: [..]:.. (/path/file)".
  const plain = (await run('losetup', ['-a'])).stdout.split('\n').filter((line) => line.includes(`(${dir}/`));
  const loops = [...new Set([...(await listLoopDevices()).filter((l) => inside(l.backingFile)).map((l) => l.name), ...plain.map((line) => line.split(':')[0]!)])];
  const livePids: number[] = [];
  for (const pid of pids) {
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
    if (stat !== undefined && !/\) Z /.test(stat)) livePids.push(pid);
  }
  return { mounts, loops, livePids };
}

/** PIDs recorded in a lab's state file (empty if there is none). */
export async function recordedPids(dir: string): Promise<number[]> {
  return ((await readLabState(path.join(dir, 'lab-state.json')))?.processes ?? []).map((p) => p.pid);
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs bin/snapshift (optionally through a wrapper such as setpriv) and returns its exit code and output. */
export async function snapshift(args: readonly string[], options: { env?: NodeJS.ProcessEnv; wrapper?: readonly string[] } = {}): Promise<CliResult> {
  const [program, ...rest] = [...(options.wrapper ?? []), snapshiftBin, ...args];
  try {
    const { stdout, stderr } = await run(program!, rest, { env: { ...process.env, ...options.env }, timeout: 180_000 });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failure = error as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof failure.code === 'number' ? failure.code : -1, stdout: failure.stdout ?? '', stderr: failure.stderr ?? '' };
  }
}

/** One QMP command on a fresh connection (greeting, qmp_capabilities, command); for asserting what QEMU exposes. */
export async function qmpOnce(socketPath: string, execute: string): Promise<unknown> {
  const net = await import('node:net');
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    let buffer = '';
    let sent = 0;
    const timer = setTimeout(() => socket.destroy(new Error(`QMP ${execute}: no answer`)), 10_000);
    socket.setEncoding('utf8');
    socket.on('error', reject);
    socket.on('data', (data: string) => {
      buffer += data;
      let newline: number;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        const message = JSON.parse(buffer.slice(0, newline)) as { QMP?: unknown; return?: unknown; error?: { desc: string }; event?: string };
        buffer = buffer.slice(newline + 1);
        if (message.event) continue;
        if (message.error) return reject(new Error(message.error.desc));
        if (message.QMP) socket.write(`${JSON.stringify({ execute: 'qmp_capabilities' })}\n`), sent++;
        else if (sent === 1) socket.write(`${JSON.stringify({ execute })}\n`), sent++;
        else {
          clearTimeout(timer);
          socket.end();
          resolve(message.return);
        }
      }
    });
  });
}
