/** Where the server is: REST on this page's origin, the WebSocket on the port /app/config.json names. */

export interface AppConfig {
  wsUrl: string;
  devLogin: boolean;
}

interface ServerConfig {
  ws_port?: number;
  ws_path?: string;
  ws_url?: string;
  dev_login?: boolean;
}

export const BASE = import.meta.env.BASE_URL; // "/app/"

export function wsUrlFrom(server: ServerConfig, where: Location = window.location): string {
  if (server.ws_url) return server.ws_url;
  const scheme = where.protocol === "https:" ? "wss:" : "ws:";
  const port = server.ws_port ?? 8443;
  return `${scheme}//${where.hostname}:${port}${server.ws_path ?? "/v1/ws"}`;
}

const SAVED = "sessiond.config";

/** The server's config. Offline: the service worker's cached copy, else the last one this page saw, else the
 *  defaults of DESIGN §9 (same host, port 8443). */
export async function loadConfig(): Promise<AppConfig> {
  let server: ServerConfig | null = null;
  try {
    const response = await fetch(`${BASE}config.json`, { cache: "no-cache" });
    if (response.ok) {
      server = (await response.json()) as ServerConfig;
      localStorage.setItem(SAVED, JSON.stringify(server));
    }
  } catch {
    // offline: below
  }
  if (server === null) {
    try {
      server = JSON.parse(localStorage.getItem(SAVED) ?? "{}") as ServerConfig;
    } catch {
      server = {};
    }
  }
  return { wsUrl: wsUrlFrom(server), devLogin: server.dev_login ?? false };
}
