import { promises as fs } from 'node:fs';
import { guestLinePrefix } from './guest-init-script.ts';

/** One heartbeat of the guest's workload (printed once a second; see guest-init-script.ts). */
export interface Heartbeat {
  /** Guest uptime in seconds when printed. */
  uptimeS: number;
  /** Writes done since the workload started (each `blockKiB`, 64 KiB by default). */
  writes: number;
  /** MiB written since the workload started. */
  writtenMiB: number;
  /** Writes the guest is behind its target rate (TCG may not keep up). */
  behind: number;
  /** Slowest write in the last second, in centiseconds. */
  maxLatencyCs: number;
  errors: number;
}

export type GuestEvent =
  | { kind: 'workload-start'; uptimeS: number; rateMiBps: number; blockKiB: number; direct: boolean }
  | ({ kind: 'heartbeat' } & Heartbeat)
  | { kind: 'workload-stop'; writes: number; writtenMiB: number; errors: number }
  | { kind: 'md5'; md5: string }
  | { kind: 'poweroff' }
  | { kind: 'fatal'; message: string };

/** Parses the guest's console lines; lines that are not ours (kernel messages) are skipped. */
export function parseGuestConsole(text: string): GuestEvent[] {
  const events: GuestEvent[] = [];
  for (const rawLine of text.split('\n')) {
    const line = rawLine.replace(/\r$/, '');
    const at = line.indexOf(`${guestLinePrefix} `);
    if (at < 0) continue;
    const [word = '', ...rest] = line.slice(at + guestLinePrefix.length + 1).trim().split(/\s+/);
    const fields = new Map(rest.map((pair) => pair.split('=') as [string, string]));
    const num = (key: string): number => Number(fields.get(key) ?? NaN);
    switch (word) {
      case 'WORKLOAD_START':
        events.push({ kind: 'workload-start', uptimeS: num('uptime'), rateMiBps: num('rate'), blockKiB: num('bs'), direct: fields.get('direct') === '1' });
        break;
      case 'HB':
        events.push({ kind: 'heartbeat', uptimeS: num('t'), writes: num('w'), writtenMiB: num('mib'), behind: num('behind'), maxLatencyCs: num('maxlat_cs'), errors: num('errs') });
        break;
      case 'WORKLOAD_STOP':
        events.push({ kind: 'workload-stop', writes: num('w'), writtenMiB: num('mib'), errors: num('errs') });
        break;
      case 'MD5':
        if (rest[0] && /^[0-9a-f]{32}$/.test(rest[0])) events.push({ kind: 'md5', md5: rest[0] });
        break;
      case 'POWEROFF':
        events.push({ kind: 'poweroff' });
        break;
      case 'FATAL':
        events.push({ kind: 'fatal', message: rest.join(' ') });
        break;
    }
  }
  return events;
}

/** The heartbeats a guest printed to its console log so far, oldest first. */
export async function readGuestHeartbeats(file: string): Promise<Heartbeat[]> {
  return parseGuestConsole(await readGuestConsole(file)).flatMap((event) => (event.kind === 'heartbeat' ? [event] : []));
}

export async function readGuestConsole(file: string): Promise<string> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return '';
    throw error;
  }
}

/** The last `count` lines of a console log, for error messages. */
export function consoleTail(text: string, count = 8): string {
  return text.split('\n').filter((line) => line.trim() !== '').slice(-count).join(' | ');
}
