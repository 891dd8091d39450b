/**
 * One real sessiond for the integration project (embedded store in a temp data dir), started before the tests and
 * stopped after them. Tests reach it through `inject("sessiond")`.
 */

import type { TestProject } from "vitest/node";

import { Sessiond } from "./sessiond.js";

declare module "vitest" {
  export interface ProvidedContext {
    sessiond: { http: string; ws: string; secret: string };
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const server = new Sessiond();
  try {
    await server.start();
  } catch (exc) {
    await server.stop("SIGKILL");
    server.removeData();
    throw exc;
  }
  project.provide("sessiond", { http: server.http, ws: server.ws, secret: server.secret });
  return async () => {
    await server.stop("SIGTERM");
    server.removeData();
  };
}
