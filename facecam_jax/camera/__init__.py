"""Camera conditioning: MediaPipe landmarks, landmark maps, the proxy head, trajectories, pose.

FaceCam encodes the target camera as a video of rasterised facial landmarks (paper 3.3,
SPEC 5). Submodules: `landmarks` (MediaPipe face mesh), `draw` (official-identical landmark
maps; `mesh_topology` holds MediaPipe's edges and colours), `proxy_head` (a generic 3D head),
`trajectories` (official orbit, canonical motions, projection), `pose` (head pose by PnP and
the camera-correctness judgement), `source` (official source-video preprocessing, video I/O),
`preview` (CLI).
Import the submodules directly; nothing here imports mediapipe.
"""
