import { defineConfig } from "vitest/config";

// Two projects: fast unit tests against a fake WebSocket, and integration tests against a real sessiond that
// test/integration/global-setup.ts starts (and stops) once for the run.
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: "unit",
          include: ["test/*.test.ts", "test/*.test.tsx"],
          environment: "node",
        },
      },
      {
        test: {
          name: "integration",
          include: ["test/integration/*.test.ts"],
          environment: "node",
          globalSetup: ["test/integration/global-setup.ts"],
          testTimeout: 30000,
          hookTimeout: 30000,
          // one sessiond per run; tests of one file run in order, files in parallel would fight over 2 cores
          fileParallelism: false,
        },
      },
    ],
  },
});
