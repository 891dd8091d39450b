/**
 * The shared document: a task list with a counter per task, as ops on the session state (DESIGN §2).
 *
 * Tasks live in an object keyed by a client-made id (JSON Pointer ops address keys, and two devices adding at once
 * never collide); order is by creation time. Counters use `inc`, so concurrent +1s from several devices all count.
 */
import type { Json, Op } from "@sessiond/client";

export interface Task {
  id: string;
  text: string;
  done: boolean;
  count: number;
  at: number;
}

export const EMPTY_DOC: Record<string, Json> = { tasks: {} };

export function tasksOf(state: Readonly<Record<string, Json>>): Task[] {
  const raw = state.tasks;
  if (!raw || typeof raw !== "object" || Array.isArray(raw)) return [];
  const out: Task[] = [];
  for (const [id, value] of Object.entries(raw)) {
    if (!value || typeof value !== "object" || Array.isArray(value)) continue;
    const t = value as Record<string, Json>;
    out.push({
      id,
      text: typeof t.text === "string" ? t.text : "",
      done: t.done === true,
      count: typeof t.count === "number" ? t.count : 0,
      at: typeof t.at === "number" ? t.at : 0,
    });
  }
  return out.sort((a, b) => a.at - b.at || a.id.localeCompare(b.id));
}

function newId(): string {
  return `t${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

const pointer = (id: string, field?: string) => `/tasks/${id}${field ? `/${field}` : ""}`;

export const ops = {
  add(text: string): Op[] {
    return [{ op: "set", path: pointer(newId()), value: { text, done: false, count: 0, at: Date.now() } }];
  },
  toggle(task: Task): Op[] {
    return [{ op: "set", path: pointer(task.id, "done"), value: !task.done }];
  },
  bump(task: Task, by: number): Op[] {
    return [{ op: "inc", path: pointer(task.id, "count"), by }];
  },
  remove(task: Task): Op[] {
    return [{ op: "del", path: pointer(task.id) }];
  },
};
