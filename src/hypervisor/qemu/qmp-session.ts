/** A QMP event as QEMU sends it. */
export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** What the QEMU adapter needs of a QMP connection; our QmpClient provides it. */
export interface QmpSession {
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options?: { timeoutMs?: number }): Promise<T>;
  waitForEvent(name: string, predicate?: (event: QmpEvent) => boolean, options?: { timeoutMs?: number }): Promise<QmpEvent>;
  close(): Promise<void>;
}
