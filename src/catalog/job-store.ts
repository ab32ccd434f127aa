import type Database from 'better-sqlite3';

/** Session and task states (DESIGN.md words); a session ends in one of the last four. */
export const SessionState = { running: 'Running', success: 'Success', warning: 'Warning', failed: 'Failed', stopped: 'Stopped' } as const;
export type SessionState = (typeof SessionState)[keyof typeof SessionState];

export interface StoredJob {
  name: string;
  definition: Record<string, unknown>;
  createdAt: string;
  updatedAt: string;
}

export interface SessionRecord {
  id: string;
  jobName: string | null;
  state: SessionState;
  startedAt: string;
  endedAt: string | null;
  ownerPid: number;
  summary: Record<string, unknown>;
}

export interface TaskRecord {
  sessionId: string;
  vmName: string;
  state: SessionState;
  restorePointId: string | null;
  reason: string | null;
  stats: Record<string, unknown> | null;
}

/** Jobs, sessions and tasks in the catalog's database. */
export class JobStore {
  constructor(private readonly db: Database.Database) {}

  saveJob(name: string, definition: Record<string, unknown>): void {
    const now = new Date().toISOString();
    this.db
      .prepare(
        `INSERT INTO jobs (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT(name) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at`,
      )
      .run(name, JSON.stringify(definition), now, now);
  }

  getJob(name: string): StoredJob | undefined {
    const row = this.db.prepare('SELECT * FROM jobs WHERE name = ?').get(name) as JobRow | undefined;
    return row ? jobFromRow(row) : undefined;
  }

  listJobs(): StoredJob[] {
    return (this.db.prepare('SELECT * FROM jobs ORDER BY name').all() as JobRow[]).map(jobFromRow);
  }

  deleteJob(name: string): boolean {
    return this.db.prepare('DELETE FROM jobs WHERE name = ?').run(name).changes > 0;
  }

  startSession(id: string, jobName: string | null): void {
    this.db
      .prepare('INSERT INTO sessions (id, job_name, state, started_at, owner_pid, summary) VALUES (?, ?, ?, ?, ?, ?)')
      .run(id, jobName, SessionState.running, new Date().toISOString(), process.pid, '{}');
  }

  endSession(id: string, state: SessionState, summary: Record<string, unknown>): void {
    this.db.prepare('UPDATE sessions SET state = ?, ended_at = ?, summary = ? WHERE id = ?').run(state, new Date().toISOString(), JSON.stringify(summary), id);
  }

  recordTask(task: TaskRecord): void {
    this.db
      .prepare('INSERT OR REPLACE INTO tasks (session_id, vm_name, state, restore_point_id, reason, stats) VALUES (?, ?, ?, ?, ?, ?)')
      .run(task.sessionId, task.vmName, task.state, task.restorePointId, task.reason, task.stats ? JSON.stringify(task.stats) : null);
  }

  getSession(id: string): SessionRecord | undefined {
    const row = this.db.prepare('SELECT * FROM sessions WHERE id = ? OR id LIKE ? ORDER BY started_at DESC LIMIT 1').get(id, `${id}%`) as SessionRow | undefined;
    return row ? sessionFromRow(row) : undefined;
  }

  listSessions(jobName?: string, limit = 50): SessionRecord[] {
    const rows = (
      jobName === undefined
        ? this.db.prepare('SELECT * FROM sessions ORDER BY started_at DESC LIMIT ?').all(limit)
        : this.db.prepare('SELECT * FROM sessions WHERE job_name = ? ORDER BY started_at DESC LIMIT ?').all(jobName, limit)
    ) as SessionRow[];
    return rows.map(sessionFromRow);
  }

  listTasks(sessionId: string): TaskRecord[] {
    const rows = this.db.prepare('SELECT * FROM tasks WHERE session_id = ? ORDER BY vm_name').all(sessionId) as TaskRow[];
    return rows.map((row) => ({
      sessionId: row.session_id,
      vmName: row.vm_name,
      state: row.state as SessionState,
      restorePointId: row.restore_point_id,
      reason: row.reason,
      stats: row.stats ? (JSON.parse(row.stats) as Record<string, unknown>) : null,
    }));
  }

  /** Sessions still marked Running whose process is gone: a crash; they end as Failed. */
  runningSessions(): SessionRecord[] {
    return (this.db.prepare("SELECT * FROM sessions WHERE state = 'Running'").all() as SessionRow[]).map(sessionFromRow);
  }
}

interface JobRow {
  name: string;
  definition: string;
  created_at: string;
  updated_at: string;
}
interface SessionRow {
  id: string;
  job_name: string | null;
  state: string;
  started_at: string;
  ended_at: string | null;
  owner_pid: number;
  summary: string;
}
interface TaskRow {
  session_id: string;
  vm_name: string;
  state: string;
  restore_point_id: string | null;
  reason: string | null;
  stats: string | null;
}

function jobFromRow(row: JobRow): StoredJob {
  return { name: row.name, definition: JSON.parse(row.definition) as Record<string, unknown>, createdAt: row.created_at, updatedAt: row.updated_at };
}

function sessionFromRow(row: SessionRow): SessionRecord {
  return {
    id: row.id,
    jobName: row.job_name,
    state: row.state as SessionState,
    startedAt: row.started_at,
    endedAt: row.ended_at,
    ownerPid: row.owner_pid,
    summary: JSON.parse(row.summary) as Record<string, unknown>,
  };
}
