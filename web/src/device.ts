/** This browser's device id (DESIGN §3: stable per device, 1–64 of [A-Za-z0-9._-]), kept in localStorage. */

const KEY = "sessiond.device";
export const DEVICE_RE = /^[A-Za-z0-9._-]{1,64}$/;

export function deviceId(): string {
  const saved = localStorage.getItem(KEY);
  if (saved && DEVICE_RE.test(saved)) return saved;
  const made = `web-${Math.random().toString(36).slice(2, 8)}`;
  localStorage.setItem(KEY, made);
  return made;
}

export function setDeviceId(id: string): void {
  if (!DEVICE_RE.test(id)) throw new Error("a device name is 1-64 of A-Z a-z 0-9 . _ -");
  localStorage.setItem(KEY, id);
}
